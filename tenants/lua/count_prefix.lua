-- Add the cached tokens a request that used a prefix was served, if the prefix still exists.
-- KEYS: 1 prefixes, 2 prefix state. ARGV: 1 name, 2 cached tokens.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  incr_floor0(KEYS[2], ARGV[1] .. ':cached_tokens', tonumber(ARGV[2]))
end
return 1
