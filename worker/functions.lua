#!lua name=attnlstm
-- attnlstm's functions on the Redis server: a fenced lease, and a batch published only
-- while its worker holds that lease, checked in the same atomic step as the writes; and
-- the model store's serving pointer, never left naming a version that is not stored.
-- Loaded once per server (by the worker when its user may; otherwise beforehand, as
-- docker-compose's `functions` service does with deploy/load-functions.sh); workers
-- only FCALL them. VERSION must match worker/lease.py, and changes with the code. Each
-- function's ARGV below is what follows its caller's version (of_this_version, at the
-- end), but for attnlstm_version and attnlstm_release, which take none.

local VERSION = '13'

-- KEYS: lease, fence. ARGV: token, ttl_ms, and '1' for a new term.
-- A free lease goes to the token, and the fence number grows by one: a new holder. The
-- holder's own call renews it; one for a new term (a worker getting in step again,
-- maybe on a new connection after a dropped one) moves the fence number on too, so a
-- write the holder sent before, still waiting in an old connection's buffer, is
-- refused. So does a holder's call that finds the fence number gone (deleted): every
-- write at the old number would be refused, and the lease never lapse.
-- Reply: {fence number, holder's token}.
local function lease(keys, args)
  local holder = redis.call('GET', keys[1])
  if not holder then
    local fence = redis.call('INCR', keys[2])
    redis.call('SET', keys[1], args[1], 'PX', args[2])
    return {fence, args[1]}
  end
  local fence = tonumber(redis.call('GET', keys[2]))
  if holder == args[1] then
    redis.call('PEXPIRE', keys[1], args[2])
    if args[3] == '1' or not fence then
      fence = redis.call('INCR', keys[2])
    end
  end
  return {fence or 0, holder}
end

-- KEYS: lease. ARGV: token. The lease back, if the token holds it.
local function release(keys, args)
  if redis.call('GET', keys[1]) == args[1] then
    return redis.call('DEL', keys[1])
  end
  return 0
end

-- KEYS: lease, fence, input, output, dead, state, handling, anomalies.
-- ARGV: token, fence number, ttl_ms, group, maxlen, then how many forecasts, dead
-- letters and acks, how many fields of the state hash follow, the handling mark
-- (empty: unchanged), and how many anomaly events; then each forecast's series, src,
-- ts, yhat, attn, model, lo, hi (lo and hi empty: intervals off, not written); each
-- anomaly's series, src, ts, value, yhat, lo, hi, score, model; each dead letter's
-- field count and its fields, values; the ids to ack; the state's fields and values
-- (worker/state.py: a chunk of the windows, and the meta field).
-- Nothing is written unless the token holds the lease at that fence number; the lease
-- is renewed with the writes. The mark says which entries the worker handles next
-- (worker/attempts.py).
local ACK_CHUNK = 1000 -- ids per XACK: unpack() takes a few thousand values at most

-- KEYS: lease, fence. ARGV: token, fence number. An error reply, unless the token holds
-- the lease at that fence number.
local function refusal(keys, args)
  local holder, fence = redis.call('GET', keys[1]), redis.call('GET', keys[2])
  if holder ~= args[1] or fence ~= args[2] then
    return redis.error_reply(string.format(
      'FENCED the lease on %s is held by %s at fence %s, not by %s at fence %s',
      keys[1], tostring(holder), tostring(fence), args[1], args[2]))
  end
  return nil
end

-- An error reply naming the first of the streams to be written (count > 0) that holds
-- another type of value. Checked before any write: a function that fails half way keeps
-- the writes before the failure, and the worker, retrying, would publish them again.
local function not_streams(streams)
  for _, stream in ipairs(streams) do
    local kind = stream[2] > 0 and redis.call('TYPE', stream[1]).ok
    if kind and kind ~= 'stream' and kind ~= 'none' then
      return redis.error_reply(string.format(
        'WRONGTYPE %s holds a %s, not a stream: nothing was written', stream[1], kind))
    end
  end
  return nil
end

local function publish(keys, args)
  local refused = refusal(keys, args)
  if refused then
    return refused
  end
  local group, maxlen = args[4], args[5]
  local forecasts, dead, acks = tonumber(args[6]), tonumber(args[7]), tonumber(args[8])
  local anomalies = tonumber(args[11])
  refused = not_streams({{keys[4], forecasts}, {keys[8], anomalies}, {keys[5], dead}})
  if refused then
    return refused
  end
  redis.call('PEXPIRE', keys[1], args[3])
  if args[10] ~= '' then
    redis.call('SET', keys[7], args[10])
  end
  local i = 12
  for _ = 1, forecasts do
    if args[i + 6] == '' then -- intervals off
      redis.call('XADD', keys[4], 'MAXLEN', '~', maxlen, '*',
        'series', args[i], 'src', args[i + 1], 'ts', args[i + 2],
        'yhat', args[i + 3], 'attn', args[i + 4], 'model', args[i + 5])
    else
      redis.call('XADD', keys[4], 'MAXLEN', '~', maxlen, '*',
        'series', args[i], 'src', args[i + 1], 'ts', args[i + 2],
        'yhat', args[i + 3], 'attn', args[i + 4], 'model', args[i + 5],
        'lo', args[i + 6], 'hi', args[i + 7])
    end
    i = i + 8
  end
  for _ = 1, anomalies do
    redis.call('XADD', keys[8], 'MAXLEN', '~', maxlen, '*',
      'series', args[i], 'src', args[i + 1], 'ts', args[i + 2], 'value', args[i + 3],
      'yhat', args[i + 4], 'lo', args[i + 5], 'hi', args[i + 6], 'score', args[i + 7],
      'model', args[i + 8])
    i = i + 9
  end
  for _ = 1, dead do
    local n = tonumber(args[i])
    redis.call('XADD', keys[5], 'MAXLEN', '~', maxlen, '*', unpack(args, i + 1, i + n))
    i = i + n + 1
  end
  local last = i + acks - 1
  while i <= last do
    local stop = math.min(i + ACK_CHUNK - 1, last)
    redis.call('XACK', keys[3], group, unpack(args, i, stop))
    i = stop + 1
  end
  local state, kind = tonumber(args[9]), redis.call('TYPE', keys[6]).ok
  if state > 0 and (kind == 'hash' or kind == 'none') then
    -- Another kind is not the worker's: left for an admin (the worker logs it at start).
    redis.call('HSET', keys[6], unpack(args, i, i + 2 * state - 1))
  end
  return forecasts
end

-- KEYS: lease, fence, input, dead. ARGV: token, fence number, group, last delivered id,
-- entries read, maxlen, then the dead letter's fields and values, if any. Entries lost
-- unread (worker/recovery.py): the dead letter that records them, and in the same step
-- the group's read counter set to count them as read, so that they are counted once (a
-- worker killed between the two, on a server whose counter had not counted them, left
-- them to be recorded again) and Redis's lag stays true; the counter only while the
-- group's last delivered entry is still that id. With no dead letter, the counter
-- alone, set right where nothing was lost (a replica of Redis 7.0, promoted, counts
-- thousands short).
-- Reply: 1 when the counter was set, 0 when the group had moved on.
local function skip(keys, args)
  local refused = refusal(keys, args) or not_streams({{keys[4], 1}})
  if refused then
    return refused
  end
  local set = 0
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', keys[3])) do
    local info = {}
    for j = 1, #group, 2 do
      info[group[j]] = group[j + 1]
    end
    if info['name'] == args[3] and info['last-delivered-id'] == args[4] then
      redis.call('XGROUP', 'SETID', keys[3], args[3], args[4], 'ENTRIESREAD', args[5])
      set = 1
    end
  end
  if #args > 6 then
    redis.call('XADD', keys[4], 'MAXLEN', '~', args[6], '*', unpack(args, 7))
  end
  return set
end

-- KEYS: lease, fence, input, dead. ARGV: token, fence number, group, consumer, start id,
-- count, maxlen, and the dead letter's reason and what befell them. A page of the
-- group's pending entries claimed for the consumer (XAUTOCLAIM, from the start id, idle
-- or not), and, in the same step, a dead letter recording those the claim found deleted
-- from the stream (it drops them from the group: a worker killed between the two left
-- them recorded nowhere), as worker/recovery.py's other records of input lost. Reply:
-- the claim's (next start id, the entries claimed, the ids found deleted).
local function claim(keys, args)
  local refused = refusal(keys, args) or not_streams({{keys[4], 1}})
  if refused then
    return refused
  end
  local reply = redis.call('XAUTOCLAIM', keys[3], args[3], args[4], 0, args[5],
    'COUNT', args[6])
  local deleted = reply[3]
  if #deleted > 0 then
    redis.call('XADD', keys[4], 'MAXLEN', '~', args[7], '*', 'lost', #deleted,
      'reason', args[8], 'src', deleted[1], 'error',
      string.format('%d input entries %s', #deleted, args[9]))
  end
  return reply
end

-- KEYS: the pool. ARGV: token, ttl_ms (0: leaving). The workers that share a stream's
-- partitions: each announces itself with its lease renewals, and one not heard from
-- for ttl_ms is gone. Reply: the tokens of those in the pool.
local function pool(keys, args)
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', now)
  local ttl = tonumber(args[2])
  if ttl > 0 then
    redis.call('ZADD', keys[1], now + ttl, args[1])
  else
    redis.call('ZREM', keys[1], args[1])
  end
  return redis.call('ZRANGE', keys[1], 0, -1)
end

-- KEYS: the partitions mark. ARGV: P. How many partitions the stream's data is written
-- with: the mark, once set; else P, marked from now on when P > 1 (one partition leaves
-- no mark, as before partitions existed).
local function partitions(keys, args)
  local mark = redis.call('GET', keys[1])
  if mark then
    return mark
  end
  if args[1] ~= '1' then
    redis.call('SET', keys[1], args[1])
  end
  return args[1]
end

-- KEYS: serving, the models events stream, the version's stored model. Every worker
-- pointed at the version, with an event (args from index first on: its fields and
-- values) in the stream capped at about maxlen, if the version is stored. 1 when set,
-- else 0.
local function served(keys, version, maxlen, args, first)
  if redis.call('EXISTS', keys[3]) == 0 then
    return 0
  end
  -- The event first: a refused XADD (the events' key of another type) leaves nothing
  -- written, where a SET before it stayed, and workers missed the switch.
  redis.call('XADD', keys[2], 'MAXLEN', '~', maxlen, '*', unpack(args, first))
  redis.call('SET', keys[1], version)
  return 1
end

-- KEYS: serving, the models events stream, the version's stored model. ARGV: version,
-- parent (empty: none served), the events' maxlen, then the event's fields and values.
-- Every worker pointed at the version, with its event, only while the parent it was
-- fine-tuned from still serves: a candidate that another promotion or a rollback
-- overtook while it trained (or while its worker was frozen) is not served; nor is one
-- no longer stored. Reply: 1 when promoted, 0 when not.
local function promote(keys, args)
  if (redis.call('GET', keys[1]) or '') ~= args[2] then
    return 0
  end
  return served(keys, args[1], args[3], args, 4)
end

-- KEYS: serving, the models events stream, the version's stored model. ARGV: version,
-- the events' maxlen, then the event's fields and values. Every worker pointed at the
-- version, with its event, only while it is stored: a rollback to a version that a
-- newer one pushed out of the store since it was read would leave every worker
-- refusing what serves. Reply: 1 when set, 0 when the version is not stored.
local function serve(keys, args)
  return served(keys, args[1], args[2], args, 3)
end

-- KEYS: serving, the stored versions list, the version's stored model, its signature.
-- ARGV: version. The version deleted, unless it serves: checked in the same step, so a
-- rollback to it just before is never undone by the store pruning its oldest.
-- Reply: 1 when deleted, 0 when it serves.
local function drop(keys, args)
  if redis.call('GET', keys[1]) == args[1] then
    return 0
  end
  redis.call('DEL', keys[3], keys[4])
  redis.call('LREM', keys[2], 0, args[1])
  return 1
end

-- Every function but attnlstm_version and attnlstm_release takes the caller's VERSION
-- before its own ARGV, and refuses a worker of another release before it reads or writes
-- anything: laid out for another library, its arguments could write a batch wrong, or
-- half of it (a worker checks the version only as it starts and re-syncs, and in a
-- rolling upgrade the older workers call the newer library until they stop). Those two
-- keep their arguments in every release: any worker may ask, and hand its lease back.
local function of_this_version(callback)
  return function(keys, args)
    if args[1] ~= VERSION then
      local theirs = 'version ' .. tostring(args[1])
      if not string.match(tostring(args[1]), '^%d+$') then
        theirs = 'none (a release before version 12: its first argument is no version)'
      end
      return redis.error_reply('ATTNLSTM_VERSION Redis has version ' .. VERSION ..
        ' of the attnlstm functions, and this worker calls ' .. theirs)
    end
    table.remove(args, 1)
    return callback(keys, args)
  end
end

-- With Redis full (maxmemory, noeviction), a function that may write is refused: the
-- version check still answers (every start and re-sync asks it), and a lease can still
-- be handed back (a DEL frees memory), not left to lapse.
redis.register_function{
  function_name = 'attnlstm_version',
  callback = function() return VERSION end,
  flags = {'no-writes'},
}
redis.register_function('attnlstm_promote', of_this_version(promote))
redis.register_function('attnlstm_serve', of_this_version(serve))
redis.register_function('attnlstm_drop', of_this_version(drop))
redis.register_function('attnlstm_pool', of_this_version(pool))
redis.register_function('attnlstm_partitions', of_this_version(partitions))
redis.register_function('attnlstm_lease', of_this_version(lease))
redis.register_function{function_name = 'attnlstm_release', callback = release, flags = {'allow-oom'}}
redis.register_function('attnlstm_publish', of_this_version(publish))
redis.register_function('attnlstm_skip', of_this_version(skip))
redis.register_function('attnlstm_claim', of_this_version(claim))
