-- Forget a prefix. KEYS: 1 prefixes, 2 prefix state, 3 prefix leases. ARGV: 1 now_ms, 2 name.
-- Returns the JSON it was, or '' if it was absent (or its lease had ended).
purge_prefixes(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
local doc = redis.call('HGET', KEYS[1], ARGV[2])
if not doc then return '' end
forget_prefix(KEYS[1], KEYS[2], KEYS[3], ARGV[2])
return doc
