"""Jobs: whole projects labelled in the background, exactly once per task. A job's record and status
(`record`), where job state lives (`store`: the protocol and memory; `redis_store`; Redis key names in
`keys`), its life (`lifecycle`: create, cancel, fail), starting one (`service`), running it (`runner`, with
claims kept alive by `heartbeat`), posting predictions exactly once (`poster`), and where it runs (`embedded`:
a thread of the service; `queue`: rq workers, whose containers read `health`).

May import: `annotate` (a job labels through its `Labeller`), `sam3`, `labelstudio` and the base modules.
Never `http` or `cli`.
"""
