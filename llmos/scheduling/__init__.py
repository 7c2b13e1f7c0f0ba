"""The resource scheduler: where workers run, how many, and what a job can expect (issue 14).

Owns (one module each):
- `devices`: the devices of a host (CPU, CUDA with total and free memory) or those `[[device]]`
  in llmos.toml declares;
- `demand`: each model's measured load from the task table (backlog, arrival rate, service
  times at the batch sizes seen, their variability, waits, cold starts);
- `capacity`: Erlang C and its Allen–Cunneen correction, the workers a target wait needs
  (`llmos capacity`);
- `placement`: the plan (how many workers of which model on which device; eviction of idle
  models when memory is full) (`llmos plan`);
- `supervisor`: follows the plan for the worker processes of one host (`llmos supervise`, and
  inside `llmos up`), with scale-up delay and scale-down stabilization windows;
- `eta`: a submit's predicted start and finish, deadline admission;
- `aging` and `shares`: priority aging of waiting jobs, tenant shares of compute under contention.

May import llmos.manager, llmos.dispatch, llmos.registry, llmos.db, llmos.jobs, llmos.settings,
llmos.constants, llmos.errors, llmos.logs; never llmos.api, llmos.batches or llmos.nightly.
Job state is written through llmos.manager only.
"""
