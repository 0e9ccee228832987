-- wrk script for bench/tasks.py: submit tasks as fast as they are accepted.
--
--   wrk -t1 -c50 -d5s -s bench/tasks.lua http://127.0.0.1:PORT/tasks
--
-- Every request is
--   POST /tasks
--   Content-Type: application/json
--   {"task_type":"analyze_cost","agent_type":"cost"}
-- for the whole run.  Requests still in flight when wrk's time is up reach
-- the service all the same (it stores and runs those tasks), so the harness
-- counts tasks from the service's own figures, not from wrk's.

wrk.method = "POST"
wrk.body = '{"task_type":"analyze_cost","agent_type":"cost"}'
wrk.headers["Content-Type"] = "application/json"
