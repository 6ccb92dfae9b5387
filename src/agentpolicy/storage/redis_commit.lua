-- agentpolicy: the one script of the Redis store. It carries no rule of the ledger:
-- it checks document versions, then applies the writes it is given, all or nothing,
-- and remembers the result under the operation id so that a resent commit applies once.
-- Every key it touches is in KEYS: KEYS[1] the operation record, KEYS[2] the shard's
-- sequence, then every key the commit names (ARGV refers to them by position).
-- ARGV: op ttl (ms), result, at (us); then counted groups:
--   expect  (key, version)            -- "0" means absent
--   put     (key, body, ttl ms, version or "")   -- "" lets the store count
--   delete  (key)
--   index   (key, member, score)      -- "" removes, "s" takes the next sequence number
--   append  (key, entry, keep after us or "", max length or "")
-- Replies: {"R", result} replayed; {"C", key, version, body, ...} conflict; {"A", versions...}
-- applied; {"N", command, key} the store's user may not run that write on that key (ACL),
-- so nothing was written.
local i = 0
local function nxt() i = i + 1; return ARGV[i] end
local op_ttl, result, at = nxt(), nxt(), nxt()
local prior = redis.call("GET", KEYS[1])
if prior then return {"R", prior} end

local n = tonumber(nxt())
local stale = {}
for _ = 1, n do
  local k = KEYS[tonumber(nxt())]
  local want = nxt()
  if (redis.call("HGET", k, "v") or "0") ~= want then stale[#stale + 1] = k end
end
if #stale > 0 then
  local out = {"C"}
  for _, k in ipairs(stale) do
    local f = redis.call("HMGET", k, "v", "b")
    out[#out + 1] = k
    out[#out + 1] = f[1] or "0"
    out[#out + 1] = f[2] or ""
  end
  return out
end

-- Redis undoes no write of a script a refusal stops: so, before the first write, ask
-- whether the store's user may run each write the commit makes, on its key (Redis 7.0+).
if redis.acl_check_cmd then
  local may = redis.acl_check_cmd
  local j = i
  local function arg() j = j + 1; return ARGV[j] end
  local function refused()
    -- each put key and deleted key is named once (the commit's names are distinct); an index
    -- or log key may come several times, and the sequence with each new number: checked once
    for _ = 1, tonumber(arg()) do
      local k = KEYS[tonumber(arg())]
      arg()  -- the body
      local ttl = tonumber(arg())
      if arg() == "" and not may("HINCRBY", k, "v", "1") then return "HINCRBY", k end
      if not may("HSET", k, "b", "") then return "HSET", k end
      if ttl > 0 then
        if not may("PEXPIRE", k, "1") then return "PEXPIRE", k end
      elseif not may("PERSIST", k) then return "PERSIST", k end
    end
    for _ = 1, tonumber(arg()) do
      local k = KEYS[tonumber(arg())]
      if not may("DEL", k) then return "DEL", k end
    end
    local seq, added, removed = false, {}, {}
    for _ = 1, tonumber(arg()) do
      local k = KEYS[tonumber(arg())]
      arg()  -- the member
      local score = arg()
      if score == "" then
        if not removed[k] then
          if not may("ZREM", k, "m") then return "ZREM", k end
          removed[k] = true
        end
      else
        if score == "s" and not seq then
          if not may("INCR", KEYS[2]) then return "INCR", KEYS[2] end
          seq = true
        end
        if not added[k] then
          if not may("ZADD", k, "0", "m") then return "ZADD", k end
          added[k] = true
        end
      end
    end
    local logged, trimmed, aged = {}, {}, {}
    for _ = 1, tonumber(arg()) do
      local k = KEYS[tonumber(arg())]
      arg()  -- the entry
      local keep = arg()
      local max = arg()
      if not seq then
        if not may("INCR", KEYS[2]) then return "INCR", KEYS[2] end
        seq = true
      end
      if not logged[k] then
        if not may("LPUSH", k, "") then return "LPUSH", k end
        logged[k] = true
      end
      if max ~= "" and not trimmed[k] then
        if not may("LTRIM", k, "0", "0") then return "LTRIM", k end
        trimmed[k] = true
      end
      if keep ~= "" and not aged[k] then
        if not may("LINDEX", k, "-1") then return "LINDEX", k end
        if not may("RPOP", k) then return "RPOP", k end
        aged[k] = true
      end
    end
    if not may("SET", KEYS[1], "", "PX", "1") then return "SET", KEYS[1] end
  end
  local cmd, k = refused()
  if cmd then return {"N", cmd, k} end
end

local versions = {"A"}
n = tonumber(nxt())
for _ = 1, n do
  local k = KEYS[tonumber(nxt())]
  local body, ttl, v = nxt(), tonumber(nxt()), nxt()
  if v == "" then
    v = tostring(redis.call("HINCRBY", k, "v", 1))
    redis.call("HSET", k, "b", body)
  else
    redis.call("HSET", k, "v", v, "b", body)
  end
  if ttl > 0 then redis.call("PEXPIRE", k, ttl) else redis.call("PERSIST", k) end
  versions[#versions + 1] = v
end

n = tonumber(nxt())
for _ = 1, n do redis.call("DEL", KEYS[tonumber(nxt())]) end

n = tonumber(nxt())
for _ = 1, n do
  local k = KEYS[tonumber(nxt())]
  local member, score = nxt(), nxt()
  if score == "" then
    redis.call("ZREM", k, member)
  else
    if score == "s" then score = redis.call("INCR", KEYS[2]) end
    redis.call("ZADD", k, score, member)
  end
end

n = tonumber(nxt())
for _ = 1, n do
  local k = KEYS[tonumber(nxt())]
  local entry, keep, max = nxt(), nxt(), nxt()
  redis.call("LPUSH", k, redis.call("INCR", KEYS[2]) .. "\t" .. at .. "\t" .. entry)
  if max ~= "" then redis.call("LTRIM", k, 0, tonumber(max) - 1) end
  if keep ~= "" then
    local limit = tonumber(keep)
    for _ = 1, 4 do  -- a few of the oldest per append: trimming keeps pace
      local last = redis.call("LINDEX", k, -1)
      local t = last and tonumber(string.match(last, "^%d+\t(%d+)\t"))
      if t and t < limit then redis.call("RPOP", k) else break end
    end
  end
end

redis.call("SET", KEYS[1], result, "PX", op_ttl)
return versions
