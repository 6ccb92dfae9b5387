-- confirm or release one reservation. KEYS[1] the reservation hash. ARGV[1] JSON.
-- Returns {outcome, fields...}: OK, NF (not found), EX (expired), RL (released),
-- CF (already confirmed); with the reservation's fields after the call.
local a = cjson.decode(ARGV[1])
local P, rid, now, iso = a.P, a.rid, a.now_us, a.now_iso
local status = redis.call("HGET", KEYS[1], "status")
if not status or status == "held" then return {"NF"} end
local function reply(outcome) return {outcome, unpack(redis.call("HGETALL", KEYS[1]))} end
local agent = redis.call("HGET", KEYS[1], "agent")
local due = (status == "reserved") and tonumber(now) >= tonumber(redis.call("HGET", KEYS[1], "expires"))
if a.action == "confirm" then
  if status == "confirmed" then return reply("OK") end
  if status == "released" then return reply("RL") end
  if status == "expired" or due then return reply("EX") end
  local f = redis.call("HMGET", KEYS[1], "v", "d", "w", "approval", "version")
  for wk in string.gmatch(f[3], "[^|]+") do
    counter_apply(P .. "c:" .. wk, f[1], tonumber(f[2]), "settle")
  end
  redis.call("HSET", KEYS[1], "status", "confirmed", "updated", now)
  redis.call("ZREM", P .. "open", rid)
  local entry = {agentId = agent, at = iso, event = "confirm", reservationId = rid,
                 policyVersion = tonumber(f[5])}
  if f[4] ~= "" then entry.approvalId = f[4] end
  history(P, a.history_limit, entry)
  return reply("OK")
end
if status == "confirmed" then return reply("CF") end
if status == "released" or status == "expired" then return reply("OK") end
close_reservation(P, rid, due and "expired" or "released", now, iso, agent, a.history_limit)
return reply("OK")
