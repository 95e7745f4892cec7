-- Reset usage: zero the day and month counters but keep the reservations of requests in flight
-- (so their settlement stays exact), and drop the per-minute windows and minute counters.
-- KEYS: 1 day counters, 2 month counters, 3.. keys to delete. ARGV: 1 day_ttl_s, 2 month_ttl_s.
for i = 1, 2 do
  local reserved = num(redis.call('HGET', KEYS[i], 'reserved'))
  redis.call('DEL', KEYS[i])
  if reserved > 0 then
    redis.call('HSET', KEYS[i], 'charged', reserved, 'reserved', reserved)
    redis.call('EXPIRE', KEYS[i], ARGV[i])
  end
end
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
