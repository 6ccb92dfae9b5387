-- KEYS[1] the policy hash, KEYS[2] the open-reservation index; ARGV[1] the plan as JSON.
-- Checks first, writes after: Redis does not roll back a script's earlier writes.
local plan = cjson.decode(ARGV[1])
local P, agent, now, iso = plan.P, plan.agent, plan.now_us, plan.now_iso
local version = tonumber(redis.call("HGET", KEYS[1], "version") or "0")
if version ~= plan.version then return "S" end
local idem = nil
if plan.idem_key then
  idem = P .. "idem:" .. plan.idem_key
  local f = redis.call("HMGET", idem, "fp", "created", "record")
  if f[1] and tonumber(now) - tonumber(f[2]) < tonumber(plan.idem_ttl_us) then
    if f[1] ~= plan.fp then return "C" end
    return "R" .. f[3]
  end
end
expire_due(P, now, iso, agent, plan.history_limit, plan.routes)

local usage, counters, emitted = {}, {}, 0
for i, w in ipairs(plan.windows) do
  local key = P .. "c:" .. w.key
  local d, s, r, exists = counter(key)
  counters[i] = {key = key}
  if exists then
    usage[w.key] = {value = add(s, r), decimals = d, symbol = plan.symbol}
  end
end

local code = plan.on_pass
if code == "ALLOWED" or code == "APPROVAL_REQUIRED" then
  for _, l in ipairs(plan.limits) do
    local used = usage[l.key]
    local uv, ud = "0", 0
    if used then uv, ud = used.value, used.decimals end
    local D = math.max(ud, plan.d, l.d)
    local total = add(scale(uv, D - ud), scale(plan.v, D - plan.d))
    if cmp(total, scale(l.v, D - l.d)) > 0 then code = l.code; break end
  end
end

local entry = {agentId = agent, at = iso, event = "decision", code = code,
               policyVersion = plan.version, usage = usage}
if code == "ALLOWED" or code == "APPROVAL_REQUIRED" then
  local held = code == "APPROVAL_REQUIRED"
  local rkey = P .. "r:" .. plan.rid
  local expires_us, expires_iso = plan.r_expires_us, plan.r_expires_iso
  if held then
    expires_us, expires_iso = plan.a_expires_us, plan.a_expires_iso
    local akey = P .. "a:" .. plan.aid
    redis.call("HSET", akey, "body", plan.a_body, "status", "pending", "decided", "", "agent", agent,
               "approvers", plan.approvers, "required", plan.required, "approvals", 0,
               "hold", plan.rid, "expires", expires_us)
    redis.call("PEXPIRE", akey, plan.keep_ms)
    redis.call("ZADD", P .. "pending", now, plan.aid)
    entry.approvalId = plan.aid
    emitted = emit(P, plan.routes, "approval.created", plan.aid, agent, iso)
  else
    entry.reservationId = plan.rid
  end
  entry.expiresAt = expires_iso
  local keys = {}
  for _, w in ipairs(plan.windows) do keys[#keys + 1] = w.key end
  redis.call("HSET", rkey, "request", plan.request, "agent", agent, "created", now,
             "symbol", plan.symbol, "status", held and "held" or "reserved",
             "expires", expires_us, "updated", now, "v", plan.v, "d", plan.d,
             "w", table.concat(keys, "|"), "approval", plan.aid or "", "version", plan.version)
  redis.call("PEXPIRE", rkey, plan.keep_ms)
  redis.call("ZADD", KEYS[2], expires_us, plan.rid)
  for i, w in ipairs(plan.windows) do
    counter_apply(counters[i].key, plan.v, plan.d, "reserve")
    redis.call("PEXPIRE", counters[i].key, w.ttl_ms)
  end
end
local text = history(P, plan.history_limit, entry, plan.request)
local reply = cjson.encode(entry)  -- without the request, which the caller already has
if idem then
  redis.call("HSET", idem, "fp", plan.fp, "created", now, "record", text)
  redis.call("PEXPIRE", idem, plan.idem_keep_ms)
end
return ((emitted > 0) and "E" or "") .. "N" .. reply
