-- KEYS[1] the policy hash. ARGV: body, updated (ISO), agent, now_iso, history_limit, P.
local version = redis.call("HINCRBY", KEYS[1], "version", 1)
redis.call("HSET", KEYS[1], "body", ARGV[1], "updated", ARGV[2])
redis.call("HSET", KEYS[1] .. ":v", version, ARGV[1] .. "\t" .. ARGV[2])
history(ARGV[6], tonumber(ARGV[5]), {agentId = ARGV[3], at = ARGV[4], event = "policy_set",
                                    policyVersion = version})
return version
