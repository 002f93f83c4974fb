-- wrk script for benchmarks/serve.py: real msr queries over keep-alive connections.
--
--   wrk -t N -c N -d <SECONDS + margin>s -s benchmarks/queries.lua http://127.0.0.1:PORT -- BODIES SECONDS
--
-- BODIES holds one JSON request body per line (POST /invocations); each thread cycles through them from its
-- own offset. Run one connection per thread (-t = -c): a thread then has at most one request in flight, so
-- it can time each request itself (wrk's own histogram adds synthetic "coordinated omission" samples) and
-- stop cleanly: after SECONDS from its first request it stops once its answer is in, and no request is
-- abandoned at the end (every answer the server delivered is one counted here). wrk's -d must exceed
-- SECONDS by more than one answer's time.
--
-- done() prints one line, "msr-bench " and a JSON object: per-status counts, answers (200s holding
-- predictions), each request's latency in ms, the measured span, and wrk's own summary.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } msr_timespec;
int clock_gettime(int clock_id, msr_timespec *tp);
]]
local clock = ffi.new("msr_timespec")
local function now()  -- seconds on CLOCK_MONOTONIC (1), shared by every thread of the process
  ffi.C.clock_gettime(1, clock)
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) * 1e-9
end

-- setup and done run in wrk's main Lua state
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

-- the rest runs in each thread's own Lua state
function init(args)
  seconds = tonumber(args[2])
  queries = {}
  for line in io.lines(args[1]) do
    if #line > 0 then
      queries[#queries + 1] = wrk.format("POST", "/invocations", {["Content-Type"] = "application/json"}, line)
    end
  end
  next_query = (id * 101) % #queries
  latencies, statuses, answers, sent = {}, {}, 0, nil
  started, finished = nil, nil
end

function request()
  sent = now()
  if started == nil then started = sent end
  next_query = next_query % #queries + 1
  return queries[next_query]
end

function response(status, headers, body)
  local t = now()
  latencies[#latencies + 1] = (t - sent) * 1000
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status == 200 and body:find('"predictions"', 1, true) then answers = answers + 1 end
  finished = t
  if t - started >= seconds then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local total, counts, lat, first, last = 0, {}, {}, nil, nil
  for _, t in ipairs(threads) do
    total = total + t:get("answers")
    for k, v in pairs(t:get("statuses")) do counts[k] = (counts[k] or 0) + v end
    for _, v in ipairs(t:get("latencies")) do lat[#lat + 1] = string.format("%.3f", v) end
    local s, f = t:get("started"), t:get("finished")
    if s and (first == nil or s < first) then first = s end
    if f and (last == nil or f > last) then last = f end
  end
  local codes = {}
  for k, v in pairs(counts) do codes[#codes + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'msr-bench {"answers":%d,"statuses":{%s},"span_s":%.6f,"latencies_ms":[%s],' ..
    '"wrk":{"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}}\n',
    total, table.concat(codes, ","), (first and last) and (last - first) or 0, table.concat(lat, ","),
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout))
end
