-- One approver's decision. KEYS[1] the approval hash. ARGV[1] JSON.
-- Returns NF, NP (not pending), NA (not an approver), DD (duplicate) or OK.
local a = cjson.decode(ARGV[1])
local P, now, iso = a.P, a.now_us, a.now_iso
local status = redis.call("HGET", KEYS[1], "status")
if not status then return "NF" end
local agent = redis.call("HGET", KEYS[1], "agent")
if status == "pending" and tonumber(now) >= tonumber(redis.call("HGET", KEYS[1], "expires")) then
  expire_due(P, now, iso, agent, a.history_limit, a.routes)
  return "NP"
end
if status ~= "pending" then return "NP" end
local approvers = "\n" .. redis.call("HGET", KEYS[1], "approvers") .. "\n"
if not string.find(approvers, "\n" .. a.folded .. "\n", 1, true) then return "NA" end
if redis.call("SADD", KEYS[1] .. ":w", a.folded) == 0 then return "DD" end
redis.call("RPUSH", KEYS[1] .. ":v", a.vote)
redis.call("PEXPIRE", KEYS[1] .. ":w", a.keep_ms)
redis.call("PEXPIRE", KEYS[1] .. ":v", a.keep_ms)
local detail = a.approver .. ": " .. a.decision
if a.comment then detail = detail .. " (" .. a.comment .. ")" end
history(P, a.history_limit, {agentId = agent, at = iso, event = "vote", approvalId = a.aid,
                             code = a.decision, detail = detail})
local emitted = 0
local hold = redis.call("HGET", KEYS[1], "hold")
if a.decision == "deny" then
  redis.call("HSET", KEYS[1], "status", "denied", "decided", iso)
  redis.call("ZREM", P .. "pending", a.aid)
  close_reservation(P, hold, "released", now, iso, agent, a.history_limit)
  history(P, a.history_limit, {agentId = agent, at = iso, event = "approval_denied",
                               approvalId = a.aid})
  emitted = emitted + emit(P, a.routes, "approval.decision_submitted", a.aid, agent, iso, a.vote)
  emitted = emitted + emit(P, a.routes, "approval.denied", a.aid, agent, iso)
  return emitted > 0 and "OKE" or "OK"
end
local n = redis.call("HINCRBY", KEYS[1], "approvals", 1)
local approved = n >= tonumber(redis.call("HGET", KEYS[1], "required"))
if approved then
  redis.call("HSET", KEYS[1], "status", "approved", "decided", iso)
  redis.call("ZREM", P .. "pending", a.aid)
  local rkey = P .. "r:" .. hold
  redis.call("HSET", rkey, "status", "reserved", "expires", a.r_expires_us, "updated", now)
  redis.call("ZADD", P .. "open", a.r_expires_us, hold)
  history(P, a.history_limit, {agentId = agent, at = iso, event = "approval_approved",
                               approvalId = a.aid, reservationId = hold,
                               expiresAt = a.r_expires_iso})
end
emitted = emitted + emit(P, a.routes, "approval.decision_submitted", a.aid, agent, iso, a.vote)
if approved then
  emitted = emitted + emit(P, a.routes, "approval.approved", a.aid, agent, iso)
end
return emitted > 0 and "OKE" or "OK"
