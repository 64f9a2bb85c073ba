"""The operators' console (`kpi web`, DESIGN.md section 8): server-rendered pages over
the same database as the services, with JSON twins under /api/.

    app.py        the Starlette application: routes, middleware, error pages
    views.py      one function per page and its JSON twin
    controls.py   the pages that change something: silences (add, end), held rejects (release, discard)
    queries.py    every read, on the typed models, each served by an index
    charts.py     the per-trigger SVG chart, rendered on the server
    rendering.py  templates (autoescaped), the top bar (NAV), filters, JSON responses
    security.py   HTTP Basic, CSRF tokens, security headers
    forms.py      what a page with a form (POST) uses: the form, the user, a read-write transaction
    templates/, static/   Jinja2 templates and the stylesheet, shipped in the package
    server.py     `kpi web`: checks the credentials and runs uvicorn

Nothing is built at import time: server.run() builds the engine and the app.
"""
