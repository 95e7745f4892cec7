-- Settlement: release the lease and replace the reservation with the real usage. One call.
-- KEYS: 1 tenant doc, 2 leases, 3 tpm window, 4 day counters (of the admission),
--       5 month counters (of the admission), 6 minute counters (of the settlement)
-- ARGV: 1 now_ms, 2 lease member ('' for none), 3 reserved, 4 tpm bucket (-1: none),
--       5 prompt_tokens, 6 completion_tokens, 7 cached_tokens, 8 day_ttl_s, 9 month_ttl_s,
--       10 minute_ttl_s
-- Returns 1 if the lease was still held, else 0. Mirrored by memory_store._settle.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = tonumber(ARGV[1])
local reserved = tonumber(ARGV[3])
local prompt, completion, cached = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local delta = prompt + completion - reserved

local live = 0
if ARGV[2] ~= '' then live = redis.call('ZREM', KEYS[2], ARGV[2]) end
if live == 1 then
  release(KEYS[4], reserved)
  release(KEYS[5], reserved)
end

local function record(key, ttl)
  redis.call('HINCRBY', key, 'requests', 1)
  redis.call('HINCRBY', key, 'prompt_tokens', prompt)
  redis.call('HINCRBY', key, 'completion_tokens', completion)
  redis.call('HINCRBY', key, 'cached_tokens', cached)
  redis.call('EXPIRE', key, ttl)
end

for i, key in ipairs({KEYS[4], KEYS[5]}) do
  incr_floor0(key, 'charged', delta)
  record(key, ARGV[7 + i])
end
record(KEYS[6], ARGV[10])

local b = tonumber(ARGV[4])
if b >= 0 and b >= oldest_live_bucket(now) and redis.call('HEXISTS', KEYS[3], b) == 1 then
  incr_floor0(KEYS[3], b, delta)
end
return live
