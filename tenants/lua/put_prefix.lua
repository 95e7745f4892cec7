-- Register or replace a prefix within the owner's max_prefixes and max_pinned_blocks. One call.
-- KEYS: 1 owner's tenant doc (public: unused), 2 prefixes, 3 prefix state, 4 prefix leases
-- ARGV: 1 now_ms, 2 name, 3 JSON doc, 4 pinned blocks (0: not pinned), 5 ttl_ms (0: no lease),
--       6 '1' for a tenant's prefix (the tenant must exist; its limits apply), '0' for a public one
-- Returns {-1} for an unknown tenant, {1, replaced JSON or ''} when stored, else
--   {0, n_refusals, then per refusal: limit, value, used, requested}. Mirrored by
--   memory_store._PrefixTable.put.
local now, name = tonumber(ARGV[1]), ARGV[2]
local pinned, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local quota = {}
if ARGV[6] == '1' then
  local doc = redis.call('GET', KEYS[1])
  if not doc then return {-1} end
  quota = cjson.decode(doc)['quota'] or {}
end
purge_prefixes(KEYS[2], KEYS[3], KEYS[4], now)
local old = redis.call('HGET', KEYS[2], name)

local refusals = {0, 0}
local function refuse(limit, value, used, requested)
  for _, v in ipairs({limit, value, used, requested}) do refusals[#refusals + 1] = v end
  refusals[2] = refusals[2] + 1
end
local max_prefixes = opt(quota['max_prefixes'])
local count = redis.call('HLEN', KEYS[2])
if max_prefixes and not old and count + 1 > max_prefixes then
  refuse('max_prefixes', max_prefixes, count, 1)
end
local max_pinned = opt(quota['max_pinned_blocks'])
if max_pinned and pinned > 0 then
  local used, flat = 0, redis.call('HGETALL', KEYS[3])
  for i = 1, #flat, 2 do
    local owner = string.match(flat[i], '^(.*):pinned$')
    if owner and owner ~= name then used = used + tonumber(flat[i + 1]) end
  end
  if used + pinned > max_pinned then refuse('max_pinned_blocks', max_pinned, used, pinned) end
end
if refusals[2] > 0 then return refusals end

forget_prefix(KEYS[2], KEYS[3], KEYS[4], name)
redis.call('HSET', KEYS[2], name, ARGV[3])
if pinned > 0 then redis.call('HSET', KEYS[3], name .. ':pinned', pinned) end
if ttl > 0 then
  redis.call('HSET', KEYS[3], name .. ':ttl_ms', ttl)
  redis.call('ZADD', KEYS[4], now + ttl, name)
end
return {1, old or ''}
