"""The annotation logic, between Label Studio and SAM 3: a project's label config (`labelconfig`), ontology
and thresholds (`ontology`), the prompts of a click (`prompts`), and masks turned into Label Studio regions
(`regions`, `geometry`). Around a small `Project`, one class per kind of work: interactive prompts (`clicks`),
image batches (`batches`, through `autolabel`), videos (`videos`), with `Labeller` as the one interface that
batch callers use and `Retrieve` as Label Studio's Retrieve Predictions; `backend.SAM3Backend` is the
`LabelStudioMLBase`-style class the HTTP contract serves.

May import: `sam3`, `labelstudio` and the base modules. Never `jobs`, `http` or `cli` (a job is started for it
through the callables `Retrieve` is given).
"""
