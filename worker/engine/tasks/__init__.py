"""Label-free task fidelity: how far a compressed model's answers drift from the original's, read
the way the task reads them (decoded boxes, masks, strings, neighbours), no labels needed.
One module per task; pure numpy, so the engine can call it on any runtime's outputs.
"""
