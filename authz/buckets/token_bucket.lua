-- Charge token buckets all or none, in one call (authz/buckets/base.py has the semantics;
-- authz/buckets/memory.py is the same arithmetic in Python and must stay in step).
--
-- KEYS[i]               bucket i ("<prefix>{<tag>}:<plan>:<limit>...": one hash tag for all,
--                       so a request's buckets share a Redis Cluster slot)
-- ARGV[1]               cost
-- ARGV[3i-1], ARGV[3i], ARGV[3i+1]
--                       capacity, rate (tokens per second) and flags of bucket i: 1 = shadow,
--                       2 = per request (charged 1, not `cost`), 3 = both
--
-- A shadow bucket never refuses: the request is admitted when every enforced bucket holds
-- `cost`; enforced buckets are then charged, shadow ones only if they held it too (exactly when
-- enforcement would have admitted the request).
--
-- A bucket is stored as the string "<tokens> <time in microseconds>": its level after the
-- last admitted charge and when that was. One SET ... PX writes value and TTL together. The
-- TTL is the time until the bucket is full again plus a margin: an expired (absent) bucket
-- reads as full, so idle buckets cost no memory.
--
-- Returns {allowed (1|0), retry_after, shadow_refused (1|0), then per bucket: remaining,
-- reset_after, retry_after}.
-- Numbers go back as strings because Redis truncates Lua numbers to integers.

-- Redis's own clock, so every replica of the service agrees on time. Microseconds since the
-- epoch (~1.8e15) are exact in a double.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- Same slack as memory.EPSILON: float refill arithmetic can land a hair under a whole token.
local EPSILON = 1e-9
-- Same as memory.TTL_MARGIN (1 s), in milliseconds.
local TTL_MARGIN_MS = 1000

local cost = tonumber(ARGV[1])
local n = #KEYS
local levels = {}
local allowed = 1   -- every enforced bucket holds `cost`
local complete = 1  -- every bucket does, shadow ones included

local costs = {}
local shadows = {}
for i = 1, n do
  local flags = tonumber(ARGV[3 * i + 1])
  shadows[i] = flags % 2 == 1
  if flags >= 2 then costs[i] = 1 else costs[i] = cost end
end

for i = 1, n do
  local capacity = tonumber(ARGV[3 * i - 1])
  local rate = tonumber(ARGV[3 * i])
  local level = capacity
  local stored = redis.call('GET', KEYS[i])
  if stored then
    local space = string.find(stored, ' ', 1, true)
    local tokens = space and tonumber(string.sub(stored, 1, space - 1))
    local updated = space and tonumber(string.sub(stored, space + 1))
    if not (tokens and updated) then
      return redis.error_reply('ERR authz: bucket ' .. KEYS[i] .. ' holds an unexpected value')
    end
    -- A failover can move the clock backwards: refill nothing rather than a negative amount.
    local elapsed = now - updated
    if elapsed < 0 then elapsed = 0 end
    level = tokens + elapsed * rate / 1000000
    if level > capacity then level = capacity end
  end
  levels[i] = level
  if level + EPSILON < costs[i] then
    complete = 0
    if not shadows[i] then allowed = 0 end
  end
end
local shadow_refused = 0
if allowed == 1 and complete == 0 then shadow_refused = 1 end

local out = {allowed, '0', shadow_refused}
local retry_after = 0
for i = 1, n do
  local capacity = tonumber(ARGV[3 * i - 1])
  local rate = tonumber(ARGV[3 * i])
  local shadow = shadows[i]
  local c = costs[i]
  local remaining = levels[i]
  local reset_after
  if allowed == 1 and (complete == 1 or not shadow) then
    remaining = remaining - c
    if remaining < 0 then remaining = 0 end
    reset_after = (capacity - remaining) / rate
    redis.call('SET', KEYS[i], string.format('%.17g %.17g', remaining, now),
               'PX', math.ceil(reset_after * 1000) + TTL_MARGIN_MS)
  else
    reset_after = (capacity - remaining) / rate
  end
  local wait = 0
  if remaining + EPSILON < c then wait = (c - remaining) / rate end
  -- Refused: the wait for the enforced buckets. Shadow-refused: the would-be wait.
  if ((allowed == 0 and not shadow) or (shadow_refused == 1 and shadow)) and wait > retry_after then
    retry_after = wait
  end
  out[#out + 1] = string.format('%.17g', remaining)
  out[#out + 1] = string.format('%.17g', reset_after)
  out[#out + 1] = string.format('%.17g', wait)
end
out[2] = string.format('%.17g', retry_after)
return out
