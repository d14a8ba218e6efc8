"""Label Studio, as this backend talks to it: which one and with which token (`client`), every outbound
request through one address guard and deadline (`outbound`, `watchdog`), retries (`retry`), and task media:
images fetched and decoded within bounds (`media`), videos as frames numbered the way Label Studio's player
numbers them (`video`).

May import: the base modules (`config`, `errors`, `validate`, `metrics`). Nothing about SAM 3, annotation
policy, jobs or HTTP serving.
"""
