-- Resolve a prefix for a request: the first owner holding the name (a tenant's own, then the
-- public ones), counting the request and moving its lease end to now + ttl. One call.
-- KEYS: per owner in order, 3 keys: prefixes, prefix state, prefix leases.
-- ARGV: 1 now_ms, 2 name. Returns {} when no owner holds it, else {owner index (1-based), JSON,
-- lease end (-1: none), requests, cached_tokens}. Mirrored by memory_store._PrefixTable.use.
local now, name = tonumber(ARGV[1]), ARGV[2]
for g = 1, #KEYS, 3 do
  local prefixes, state, leases = KEYS[g], KEYS[g + 1], KEYS[g + 2]
  purge_prefixes(prefixes, state, leases, now)
  if redis.call('HEXISTS', prefixes, name) == 1 then
    redis.call('HINCRBY', state, name .. ':requests', 1)
    local ttl = redis.call('HGET', state, name .. ':ttl_ms')
    if ttl then redis.call('ZADD', leases, now + tonumber(ttl), name) end
    local found = read_prefix(prefixes, state, leases, name)
    return {(g + 2) / 3, found[1], found[2], found[3], found[4]}
  end
end
return {}
