-- Authentication lookup by key hash, with the key's tenant, in one call. A miss does the same
-- work as a hit (decode a placeholder, GET a tenant document) to keep timings alike.
-- KEYS: 1 key record. ARGV: 1 key-name prefix of tenants ("pg:"), 2 placeholder key JSON.
-- Returns {key JSON or '', tenant JSON or ''}.
local key_doc = redis.call('GET', KEYS[1])
local tenant_id = cjson.decode(key_doc or ARGV[2])['tenant_id']
local tenant_doc = redis.call('GET', ARGV[1] .. '{' .. tenant_id .. '}:tenant')
return {key_doc or '', tenant_doc or ''}
