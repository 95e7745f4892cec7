-- Extend a live lease. KEYS: 1 leases. ARGV: 1 member, 2 new expiry ms, 3 now_ms.
-- Returns 1, or 0 if the lease is gone or already expired (an expired lease is lost).
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) <= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
return 1
