-- wrk script for bench/registry.py: sustained heartbeats over many agents.
--
--   wrk -t1 -c50 -d5s -s bench/heartbeat.lua http://127.0.0.1:PORT/ -- IDS [START]
--
-- IDS is a file of agent ids, one a line.  Every request is
--   POST /agents/<id>/heartbeat
--   Content-Type: application/json
--   {"status":"healthy","metadata":{"load":0.5}}
-- with the ids taken in turn, cycling, starting after the START-th (0 if not
-- given), so consecutive runs carry on round the same cycle.  The requests are
-- formatted once, in init(), so wrk spends its CPU on sending, not on Lua.

local body = '{"status":"healthy","metadata":{"load":0.5}}'
local requests = {}
local count = 0
local position = 0

function init(args)
  local path = args[1]
  if path == nil then
    error("heartbeat.lua: give the file of agent ids after --")
  end
  for id in io.lines(path) do
    if id ~= "" then
      count = count + 1
      requests[count] = wrk.format(
        "POST",
        "/agents/" .. id .. "/heartbeat",
        { ["Content-Type"] = "application/json" },
        body
      )
    end
  end
  if count == 0 then
    error("heartbeat.lua: no agent ids in " .. path)
  end
  position = (tonumber(args[2] or "0") or 0) % count
end

function request()
  position = position % count + 1
  return requests[position]
end
