-- Delete a tenant document, its key records and its index entry (so its keys fail at once).
-- Windows, leases and usage counters are deleted afterwards by a SCAN over the tenant prefix.
-- KEYS: 1 tenant doc, 2 tenant's key map, 3 tenant index. ARGV: 1 id, 2 key-record prefix.
local existed = redis.call('DEL', KEYS[1])
for _, digest in ipairs(redis.call('HVALS', KEYS[2])) do
  redis.call('DEL', ARGV[2] .. digest)
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return existed
