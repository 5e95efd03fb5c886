"""Faust table declarations and their state layouts, one module per service, plus ops views.

A table module defines its state Structs and a function that declares the table on an app
with `streams.app.state_table(app, name, StateStruct, source=SOURCE_TOPIC_SPEC)`; the
service's agent module calls it in its `install(app)`. See docs/STREAMS.md.
"""
