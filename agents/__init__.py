"""Faust agents, one module per service stream.

Each module listed in AGENT_MODULES has `install(app: streams.app.FintideApp) -> None`,
which declares that service's agents (and the tables and views they need) on the app.
`fintide worker` installs every module listed here; add yours in one line.
"""

AGENT_MODULES: list[str] = [
    "agents.ops",
    "agents.identity",
    "agents.payments",
    "agents.fraud_passthrough",
    "agents.market",
    "agents.fraud",
]
