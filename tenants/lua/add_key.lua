-- Store a key record if its tenant exists.
-- KEYS: 1 tenant doc, 2 key record, 3 tenant's key_id -> hash map.
-- ARGV: 1 key JSON, 2 key_id, 3 key hash.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return 1
