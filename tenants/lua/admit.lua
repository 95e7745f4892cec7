-- Admission: check every limit of one tenant; if all pass, take a concurrency lease and reserve
-- prompt_tokens + max_tokens in the tokens window and the day and month budgets. One call.
-- KEYS: 1 tenant doc, 2 rpm window, 3 tpm window, 4 leases, 5 day counters, 6 month counters
-- ARGV: 1 now_ms, 2 lease member, 3 lease expiry ms, 4 prompt_tokens, 5 max_tokens,
--       6 day_end_ms, 7 month_end_ms, 8 day_ttl_s, 9 month_ttl_s, 10 tenant key prefix
-- Returns {-1} for an unknown tenant, else
--   {admitted, lease_expiry, tpm_bucket, rpm_limit, rpm_used, rpm_reset_ms,
--    tpm_limit, tpm_used, tpm_reset_ms, in_flight, n_refusals,
--    then per refusal: limit, retry_ms (-1: never fits), hard, value, used, requested}
-- (limits are -1 when unlimited). Mirrored by memory_store._admit.
local doc = redis.call('GET', KEYS[1])
if not doc then return {-1} end
local quota = cjson.decode(doc)['quota'] or {}
local now = tonumber(ARGV[1])
local max_tokens = tonumber(ARGV[5])
local cost = tonumber(ARGV[4]) + max_tokens

reclaim(KEYS[4], ARGV[10], now)
-- A resent call (its first reply was lost) finds its lease: admitted already, charge nothing.
local held = redis.call('ZSCORE', KEYS[4], ARGV[2])
local in_flight = redis.call('ZCARD', KEYS[4])
local day = redis.call('HMGET', KEYS[5], 'charged', 'reserved')
local month = redis.call('HMGET', KEYS[6], 'charged', 'reserved')
local rpm_limit, tpm_limit = opt(quota['requests_per_minute']), opt(quota['tokens_per_minute'])
local rpm_used, rpm_live, tpm_used, tpm_live = 0, {}, 0, {}
if rpm_limit then rpm_used, rpm_live = window(KEYS[2], now) end
if tpm_limit then tpm_used, tpm_live = window(KEYS[3], now) end

local refusals = {}
local function refuse(name, retry, hard, value, used, requested)
  for _, v in ipairs({name, retry or -1, hard and 1 or 0, value, used, requested}) do
    refusals[#refusals + 1] = v
  end
end

local function check_budget(name, limit, counters, until_end)
  local charged, reserved = num(counters[1]), num(counters[2])
  if not limit or charged + cost <= limit then return end
  local hard = charged - reserved + cost > limit
  local retry = nil
  if cost <= limit then retry = hard and until_end or RETRY_SOFT_MS end
  refuse(name, retry, hard, limit, charged, cost)
end

-- Until enough old buckets leave the window for `need` to fit; nil if it never fits.
local function wait_ms(live, used, need, limit)
  if need > limit then return nil end
  table.sort(live, function(x, y) return x[1] < y[1] end)
  local freed = 0
  for _, e in ipairs(live) do
    freed = freed + e[2]
    if used - freed + need <= limit then return bucket_expiry(e[1]) - now end
  end
  return nil
end

local function check_window(name, limit, used, live, need)
  if not limit or used + need <= limit then return end
  refuse(name, wait_ms(live, used, need, limit), false, limit, used, need)
end

if not held then
  local max_per_request = opt(quota['max_tokens_per_request'])
  if max_per_request and max_tokens > max_per_request then
    refuse('max_tokens_per_request', nil, false, max_per_request, 0, max_tokens)
  end
  check_budget('tokens_per_month', opt(quota['tokens_per_month']), month, tonumber(ARGV[7]) - now)
  check_budget('tokens_per_day', opt(quota['tokens_per_day']), day, tonumber(ARGV[6]) - now)
  local concurrency = opt(quota['max_concurrent_requests'])
  if concurrency and in_flight + 1 > concurrency then
    refuse('max_concurrent_requests', RETRY_SOFT_MS, false, concurrency, in_flight, 1)
  end
  check_window('requests_per_minute', rpm_limit, rpm_used, rpm_live, 1)
  check_window('tokens_per_minute', tpm_limit, tpm_used, tpm_live, cost)
end

-- Window state for the headers: reset when the newest non-empty bucket leaves the window.
local function state(limit, used, live)
  if not limit then return -1, 0, 0 end
  local newest = nil
  for _, e in ipairs(live) do
    if e[2] > 0 and (not newest or e[1] > newest) then newest = e[1] end
  end
  local reset = 0
  if newest then reset = bucket_expiry(newest) - now end
  return limit, used, reset
end

local admitted, lease_expiry, tpm_bucket = 0, 0, -1
if held then
  admitted, lease_expiry = 1, tonumber(held)
  if tpm_limit then tpm_bucket = math.floor(now / BUCKET_MS) end
elseif #refusals == 0 then
  admitted, lease_expiry = 1, tonumber(ARGV[3])
  local bucket = math.floor(now / BUCKET_MS)
  local window_ttl = (BUCKETS + 1) * BUCKET_MS
  redis.call('ZADD', KEYS[4], lease_expiry, ARGV[2])
  in_flight = in_flight + 1
  if rpm_limit then
    redis.call('HINCRBY', KEYS[2], bucket, 1)
    redis.call('PEXPIRE', KEYS[2], window_ttl)
    rpm_used = rpm_used + 1
    rpm_live[#rpm_live + 1] = {bucket, 1}
  end
  if tpm_limit then
    redis.call('HINCRBY', KEYS[3], bucket, cost)
    redis.call('PEXPIRE', KEYS[3], window_ttl)
    tpm_used, tpm_bucket = tpm_used + cost, bucket
    tpm_live[#tpm_live + 1] = {bucket, cost}
  end
  for i, key in ipairs({KEYS[5], KEYS[6]}) do
    redis.call('HINCRBY', key, 'charged', cost)
    redis.call('HINCRBY', key, 'reserved', cost)
    redis.call('EXPIRE', key, ARGV[7 + i])
  end
end

local out = {admitted, lease_expiry, tpm_bucket}
local a, b, c = state(rpm_limit, rpm_used, rpm_live)
out[4], out[5], out[6] = a, b, c
a, b, c = state(tpm_limit, tpm_used, tpm_live)
out[7], out[8], out[9] = a, b, c
out[10], out[11] = in_flight, #refusals / 6
for _, v in ipairs(refusals) do out[#out + 1] = v end
return out
