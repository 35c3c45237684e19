"""The job language that the client, the API and the worker share: step configs (typed, versioned),
presets, the domain errors, and the checks of a dataset's shape against a model's input.

Nothing here imports the service, the worker, torch or FastAPI, so the API can validate a job
without loading the engine, and the engine can raise the same errors the API maps to HTTP.
"""
