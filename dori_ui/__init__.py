"""The Gradio interface. It lays out and wires components; every computation is a call into `analysis`."""

# Events that run the model share this concurrency id, so one runs at a time and the rest wait in the queue.
MODEL_CONCURRENCY_ID = "model"
