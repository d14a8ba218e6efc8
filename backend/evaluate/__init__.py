"""Evaluation: how good SAM 3's pre-annotations are for a project, measured against the project's own human
annotations, before anyone trusts them on 100k images. Regions of every kind the backend emits and Label Studio
stores turned into masks as COCO does (`shapes`), matched one to one per label by mask IoU (`match`), counted,
curved and scored with COCO's own AP (`metrics`), per task (`evaluator`), and written up as JSON and a one-page
HTML report with a threshold per label to paste back into the Connect Model form (`report`).

May import: `annotate`, `sam3`, `labelstudio` and the base modules. Never `jobs`, `http` or `cli` (jobs run
evaluations; this package only evaluates).
"""
