-- wrk script of benchmarks/proxy_cost.py's high-rate part: non-streamed chat completions, each
-- connection waiting an exponential think time before each request, and one JSON line of results.
--
--   BENCH_SEED=1 BENCH_THINK_MS=40 [BENCH_AUTHORIZATION='Bearer ...'] \
--     wrk -t1 -c200 -d20s --timeout 30s -s wrk-think.lua http://127.0.0.1:PORT/v1/chat/completions
--
-- The Authorization header comes from the environment, not wrk's arguments, so that it is not in
-- `ps`. wrk's script API (delay, done, summary, latency:percentile) is its SCRIPTING file
-- (/usr/share/doc/wrk/SCRIPTING.gz): delay() is in milliseconds, which wrk's C side truncates to an
-- integer; latency values are microseconds. The client's lateness (a request written later than
-- its think time ended: wrk's own event loop busy) is measured here with CLOCK_MONOTONIC through
-- LuaJIT's FFI (the Lua that Debian's wrk links): each request is matched with the earliest think
-- time still pending, which gives the same set of latenesses whichever of the requests due in one
-- loop pass is written first.

local seed = tonumber(os.getenv("BENCH_SEED") or "1")
local think_ms = tonumber(os.getenv("BENCH_THINK_MS") or "40")
local thread_id = 0
local created = 0

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } hpcserve_timespec;
int clock_gettime(int clock_id, hpcserve_timespec *tp);
]]
local now_ts = ffi.new("hpcserve_timespec")
local function now_us()
   ffi.C.clock_gettime(1, now_ts)   -- CLOCK_MONOTONIC
   return tonumber(now_ts.tv_sec) * 1e6 + tonumber(now_ts.tv_nsec) / 1e3
end

-- a binary min-heap of the times (us) at which pending think times end
local due, due_n = {}, 0
local function push(value)
   due_n = due_n + 1
   local i = due_n
   due[i] = value
   while i > 1 do
      local parent = math.floor(i / 2)
      if due[parent] <= due[i] then break end
      due[parent], due[i] = due[i], due[parent]
      i = parent
   end
end
local function pop()
   local top = due[1]
   due[1] = due[due_n]
   due[due_n] = nil
   due_n = due_n - 1
   local i = 1
   while true do
      local left, right, smallest = 2 * i, 2 * i + 1, i
      if left <= due_n and due[left] < due[smallest] then smallest = left end
      if right <= due_n and due[right] < due[smallest] then smallest = right end
      if smallest == i then break end
      due[smallest], due[i] = due[i], due[smallest]
      i = smallest
   end
   return top
end
lateness = {}   -- global: done() runs in the main script state and reads it with thread:get
local threads = {}

wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
wrk.headers["Content-Type"] = "application/json"
local authorization = os.getenv("BENCH_AUTHORIZATION")
if authorization and authorization ~= "" then
   wrk.headers["Authorization"] = authorization
end

function setup(thread)
   created = created + 1
   thread:set("thread_id", created)
   threads[#threads + 1] = thread
end

function init(args)
   math.randomseed(seed * 1000 + thread_id)
end

function delay()
   -- exponential with mean think_ms, rounded to whole milliseconds as wrk's timer takes them
   local ms = math.floor(-think_ms * math.log(1 - math.random()) + 0.5)
   push(now_us() + ms * 1000)
   return ms
end

local formatted = nil
function request()
   if due_n > 0 then
      lateness[#lateness + 1] = math.max(0, now_us() - pop())
   end
   formatted = formatted or wrk.format()
   return formatted
end

local function percentile(values, q)
   if #values == 0 then return -1 end
   table.sort(values)
   return values[math.min(#values, math.floor(q / 100 * #values) + 1)]
end

function done(summary, latency, requests)
   local e = summary.errors
   local late = {}
   for _, thread in ipairs(threads) do
      for _, value in ipairs(thread:get("lateness")) do late[#late + 1] = value end
   end
   io.write(string.format(
      'wrk-json: {"duration_us": %d, "requests": %d, "connect_errors": %d, "read_errors": %d, ' ..
      '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, ' ..
      '"p99.9_us": %d, "max_us": %d, "mean_us": %.1f, "lateness_p99_us": %d, "lateness_max_us": %d}\n',
      summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
      latency.mean, percentile(late, 99), percentile(late, 100)))
end
