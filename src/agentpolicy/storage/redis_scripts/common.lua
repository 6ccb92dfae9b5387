-- agentpolicy: shared by every script. Amounts are decimal strings: Lua numbers
-- are doubles, exact only to 2^53, so amounts are never turned into numbers.
-- Every key of one agent starts with P (the prefix with the agent's hash tag).

local function strip(a)
  a = string.gsub(a, "^0+", "")
  if a == "" then return "0" end
  return a
end

local function cmp(a, b)
  a = strip(a); b = strip(b)
  if #a ~= #b then return (#a < #b) and -1 or 1 end
  if a == b then return 0 end
  return (a < b) and -1 or 1
end

-- Up to 15 digits a double is exact, and so is the sum of two: the common case.
local function small(a, b) return #a <= 15 and #b <= 15 end

local function add(a, b)
  a = strip(a); b = strip(b)
  if small(a, b) then return string.format("%.0f", tonumber(a) + tonumber(b)) end
  local out, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local s = carry
    if i > 0 then s = s + string.byte(a, i) - 48; i = i - 1 end
    if j > 0 then s = s + string.byte(b, j) - 48; j = j - 1 end
    out[#out + 1] = string.char(48 + s % 10)
    carry = math.floor(s / 10)
  end
  return strip(string.reverse(table.concat(out)))
end

-- max(0, a - b): a counter never goes below zero
local function sub0(a, b)
  a = strip(a); b = strip(b)
  if cmp(a, b) <= 0 then return "0" end
  if small(a, b) then return string.format("%.0f", tonumber(a) - tonumber(b)) end
  local out, borrow, i, j = {}, 0, #a, #b
  while i > 0 do
    local s = string.byte(a, i) - 48 - borrow; i = i - 1
    if j > 0 then s = s - (string.byte(b, j) - 48); j = j - 1 end
    if s < 0 then s = s + 10; borrow = 1 else borrow = 0 end
    out[#out + 1] = string.char(48 + s)
  end
  return strip(string.reverse(table.concat(out)))
end

local function scale(a, n)
  if n <= 0 or a == "0" then return a end
  return a .. string.rep("0", n)
end

-- decimals, spent, reserved, and whether the counter exists
local function counter(key)
  local f = redis.call("HMGET", key, "d", "s", "r")
  return tonumber(f[1] or "0"), f[2] or "0", f[3] or "0", f[1] ~= false
end

-- op: reserve | unreserve | settle. Windows already gone (expired) get nothing back.
local function counter_apply(key, v, d, op)
  local cd, s, r, exists = counter(key)
  if op ~= "reserve" and not exists then return end
  local D = math.max(cd, d)
  s = scale(s, D - cd); r = scale(r, D - cd)
  local x = scale(v, D - d)
  if op == "reserve" then r = add(r, x)
  elseif op == "unreserve" then r = sub0(r, x)
  else r = sub0(r, x); s = add(s, x) end
  redis.call("HSET", key, "d", D, "s", s, "r", r)
end

local function history(P, limit, entry, request_json)
  local text = cjson.encode(entry)
  if request_json then
    text = string.sub(text, 1, -2) .. ',"request":' .. request_json .. '}'
  end
  local seq = redis.call("INCR", P .. "seq")
  redis.call("LPUSH", P .. "h", seq .. "\t" .. text)
  redis.call("LTRIM", P .. "h", 0, limit - 1)
  return text
end

-- Close an open reservation: give its amount back to the windows it counted in.
local function close_reservation(P, rid, status, now_us, now_iso, agent, limit)
  local rkey = P .. "r:" .. rid
  local f = redis.call("HMGET", rkey, "v", "d", "w", "approval", "version")
  for wk in string.gmatch(f[3] or "", "[^|]+") do
    counter_apply(P .. "c:" .. wk, f[1], tonumber(f[2]), "unreserve")
  end
  redis.call("HSET", rkey, "status", status, "updated", now_us)
  redis.call("ZREM", P .. "open", rid)
  local event = (status == "expired") and "expire" or "release"
  local entry = {agentId = agent, at = now_iso, event = event, reservationId = rid,
                 policyVersion = tonumber(f[5])}
  if f[4] and f[4] ~= "" then entry.approvalId = f[4] end
  history(P, limit, entry)
  return f[4]
end

-- Webhook outbox: one entry per (event, endpoint) that wants it, written with the change.
-- The approval's state at this moment is kept (status, votes) so the payload shows it.
local function emit(P, routes, event, aid, agent, iso, decision)
  if not routes or #routes == 0 then return 0 end
  local n = 0
  local eid = nil
  for _, r in ipairs(routes) do
    local wanted = #r.events == 0
    for _, e in ipairs(r.events) do if e == event then wanted = true end end
    if wanted then
      if not eid then
        eid = "evt_" .. string.sub(redis.sha1hex(P .. aid .. event .. redis.call("INCR", P .. "evseq")), 1, 32)
      end
      local akey = P .. "a:" .. aid
      local f = redis.call("HMGET", akey, "status", "decided")
      local votes = redis.call("LRANGE", akey .. ":v", 0, -1)
      local id = eid .. "." .. r.id
      local seq = redis.call("INCR", P .. "seq")
      redis.call("HSET", P .. "ob:" .. id, "id", id, "eventId", eid, "endpointId", r.id,
                 "event", event, "agentId", agent, "approvalId", aid, "createdAt", iso,
                 "astatus", f[1], "adecided", f[2] or "", "votes", table.concat(votes, "\n"),
                 "decision", decision or "", "status", "pending", "attempts", 0,
                 "nextAttemptAt", "0", "lastError", "", "seq", seq)
      redis.call("ZADD", P .. "obq", seq, id)
      n = n + 1
    end
  end
  return n
end

-- Expire every open reservation of the agent whose time is up (now >= expiresAt),
-- and the pending approvals they were held for.
local function expire_due(P, now_us, now_iso, agent, limit, routes)
  local due = redis.call("ZRANGEBYSCORE", P .. "open", "-inf", now_us)
  for _, rid in ipairs(due) do
    local held = redis.call("HGET", P .. "r:" .. rid, "status") == "held"
    local aid = close_reservation(P, rid, "expired", now_us, now_iso, agent, limit)
    if held and aid and aid ~= "" then
      local akey = P .. "a:" .. aid
      if redis.call("HGET", akey, "status") == "pending" then
        redis.call("HSET", akey, "status", "expired", "decided", now_iso)
        redis.call("ZREM", P .. "pending", aid)
        history(P, limit, {agentId = agent, at = now_iso, event = "approval_expired",
                           approvalId = aid})
        emit(P, routes, "approval.expired", aid, agent, now_iso)
      end
    end
  end
  return due
end

