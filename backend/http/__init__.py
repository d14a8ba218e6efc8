"""The HTTP contract Label Studio and people speak: the WSGI app (`app`, wiring only), the ML-backend routes
(`ml`) and the job routes (`jobs`), request bodies checked at the edge (`requests`), Basic auth (`auth`), JSON
errors whose reason phrase carries the message (`errors`), the projects set up (`projects`), Retrieve's
hand-off to jobs (`handoff`), what stops the service from starting (`startup`), and gunicorn with read
deadlines (`gunicorn`).

May import: `jobs`, `annotate`, `sam3`, `labelstudio` and the base modules. Never `cli`.
"""
