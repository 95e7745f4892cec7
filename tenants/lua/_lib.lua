-- Helpers prepended to every script by redis_store.LuaScript. Times are integer milliseconds
-- from the caller's clock. Constants must equal those of tenants/periods.py (a test checks).
local BUCKET_MS = 1000 -- sliding-window bucket
local BUCKETS = 60 -- buckets per window (60 s)
local RETRY_SOFT_MS = 1000 -- retry hint when capacity is held by requests in flight

-- A stored value (false when absent) or a JSON null as a number or nil.
local function opt(v)
  if v == nil or v == false or v == cjson.null then return nil end
  return tonumber(v)
end

local function num(v)
  return opt(v) or 0
end

local function bucket_expiry(b)
  return (b + BUCKETS) * BUCKET_MS
end

local function oldest_live_bucket(now)
  return math.floor(now / BUCKET_MS) - BUCKETS + 1
end

-- Prune buckets that left the window; return used and the live buckets {second, count}
-- (unordered: only a refusal needs them sorted).
local function window(key, now)
  local oldest = oldest_live_bucket(now)
  local flat = redis.call('HGETALL', key)
  local used, live, stale = 0, {}, {}
  for i = 1, #flat, 2 do
    local b, c = tonumber(flat[i]), tonumber(flat[i + 1])
    if b < oldest then
      stale[#stale + 1] = flat[i]
    else
      used = used + c
      live[#live + 1] = {b, c}
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return used, live
end

-- HINCRBY that never leaves the field below zero. A zero delta is skipped: Lua's -0 would be
-- sent as "-0", which HINCRBY rejects.
local function incr_floor0(key, field, delta)
  if delta == 0 then return end
  if redis.call('HINCRBY', key, field, delta) < 0 then redis.call('HSET', key, field, 0) end
end

-- An admission's reservation is no longer in flight (it stays charged).
local function release(key, amount)
  if redis.call('EXISTS', key) == 1 then incr_floor0(key, 'reserved', -amount) end
end

-- Drop expired leases (member: lease_id|reserved|day|month) and release their reservations.
local function reclaim(leases, prefix, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  for _, member in ipairs(expired) do
    local _, reserved, day, month = string.match(member, '^(.*)|(%d+)|([^|]+)|([^|]+)$')
    if reserved then
      release(prefix .. 'day:' .. day, tonumber(reserved))
      release(prefix .. 'month:' .. month, tonumber(reserved))
    end
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', leases, '-inf', now) end
end


-- Prefix registry of one owner: KEYS prefixes (name -> JSON), state (<name>:pinned, :ttl_ms,
-- :requests, :cached_tokens) and leases (name -> lease end ms).
local PREFIX_FIELDS = {':pinned', ':ttl_ms', ':requests', ':cached_tokens'}

local function forget_prefix(prefixes, state, leases, name)
  redis.call('HDEL', prefixes, name)
  local fields = {}
  for i, f in ipairs(PREFIX_FIELDS) do fields[i] = name .. f end
  redis.call('HDEL', state, unpack(fields))
  redis.call('ZREM', leases, name)
end

-- Forget every prefix whose lease ended at or before now.
local function purge_prefixes(prefixes, state, leases, now)
  for _, name in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
    forget_prefix(prefixes, state, leases, name)
  end
end

-- A live prefix for a read: {JSON, lease end (-1: none), requests, cached_tokens}, or nil.
local function read_prefix(prefixes, state, leases, name)
  local doc = redis.call('HGET', prefixes, name)
  if not doc then return nil end
  local counts = redis.call('HMGET', state, name .. ':requests', name .. ':cached_tokens')
  local lease = redis.call('ZSCORE', leases, name)
  return {doc, lease and tonumber(lease) or -1, num(counts[1]), num(counts[2])}
end
