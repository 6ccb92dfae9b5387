-- Claim due webhook deliveries of one agent for these endpoints. KEYS[1] the queue.
-- Only the oldest pending entry per endpoint and approval is deliverable (order per
-- approval); a claim pushes its next attempt out by the lease. ARGV[1] JSON.
local a = cjson.decode(ARGV[1])
local mine = {}
for _, e in ipairs(a.endpoints) do mine[e] = true end
local seen, out = {}, {}
local now = tonumber(a.now)
for _, id in ipairs(redis.call("ZRANGE", KEYS[1], 0, -1)) do
  local key = a.P .. "ob:" .. id
  local f = redis.call("HMGET", key, "endpointId", "approvalId", "nextAttemptAt")
  if f[1] and mine[f[1]] then
    local head = f[1] .. "|" .. f[2]
    if not seen[head] then
      seen[head] = true
      if a.count then
        out[#out + 1] = id
      elseif tonumber(f[3]) <= now and #out < a.limit then
        redis.call("HSET", key, "nextAttemptAt", string.format("%.6f", now + a.lease))
        out[#out + 1] = redis.call("HGETALL", key)
      end
    end
  end
end
if a.count then
  local pending = 0
  for _, id in ipairs(redis.call("ZRANGE", KEYS[1], 0, -1)) do
    if mine[redis.call("HGET", a.P .. "ob:" .. id, "endpointId") or ""] then pending = pending + 1 end
  end
  return pending
end
return out
