-- Read one live prefix, or all of an owner's. KEYS: 1 prefixes, 2 prefix state, 3 prefix leases.
-- ARGV: 1 now_ms, 2 name ('': every name). Returns flat {name, JSON, lease end (-1: none),
-- requests, cached_tokens, ...}. Mirrored by memory_store._PrefixTable.read.
purge_prefixes(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
local names = {ARGV[2]}
if ARGV[2] == '' then names = redis.call('HKEYS', KEYS[1]) end
local out = {}
for _, name in ipairs(names) do
  local found = read_prefix(KEYS[1], KEYS[2], KEYS[3], name)
  if found then
    out[#out + 1] = name
    for _, v in ipairs(found) do out[#out + 1] = v end
  end
end
return out
