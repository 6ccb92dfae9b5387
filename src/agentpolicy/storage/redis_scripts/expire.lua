-- Apply due expiries for one agent, then report. ARGV[1] JSON.
-- With a.counters: return the counters {key, d, s, r, ...}; otherwise the expired ids.
local a = cjson.decode(ARGV[1])
local due = expire_due(a.P, a.now_us, a.now_iso, a.agent, a.history_limit, a.routes)
if a.counters then
  local out = {}
  for _, wk in ipairs(a.counters) do
    local d, s, r, exists = counter(a.P .. "c:" .. wk)
    if exists then
      out[#out + 1] = wk; out[#out + 1] = tostring(d); out[#out + 1] = s; out[#out + 1] = r
    end
  end
  return out
end
return due
