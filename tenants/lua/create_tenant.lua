-- Create a tenant unless it exists. KEYS: 1 tenant doc, 2 tenant index. ARGV: 1 JSON, 2 id.
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('SADD', KEYS[2], ARGV[2])
  return 1
end
return 0
