-- Usage read: reclaim expired leases, then return the counters in one call.
-- KEYS: 1 leases, 2 day counters, 3 month counters, 4.. minute counters.
-- ARGV: 1 now_ms, 2 tenant key prefix.
-- Returns {in_flight, day HGETALL, month HGETALL, minute HGETALL...}.
reclaim(KEYS[1], ARGV[2], tonumber(ARGV[1]))
local out = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
