"""The largest request one analysis accepts: `run_task` checks these, so the app, the command line, campaigns and
`dori rerun` of an export all share them (the app's fields show the same ranges).

They bound what a single request can cost, not what the engine's Python API can do: experiments call the
analyses directly, without them. README's "Limits" table lists them all.
"""

MAX_SEEDS = 64  # seeds of one generation, evaluation or localizer criterion
MAX_SEED = 2**31 - 1  # largest seed value (what a gr.Number and most RNG front ends take)
# Denoising steps: far above any DDIM use (the paper samples with 50), and within SD's 1000-timestep schedule,
# which with its steps_offset=1 has no room for 1000.
MAX_DENOISING_STEPS = 500
MAX_SEARCH_STEPS = 1000  # Dori search iterations
MAX_SEARCH_BATCH = 64  # seeds per Dori search step
MAX_STARTS = 256  # Dori search starts, triggers of a set, sweep directions
MAX_FINETUNE_ROUNDS = 100  # rounds of adversarial fine-tuning (trigger search, training, evaluation)
MAX_FINETUNE_STEPS = 10_000  # training steps per fine-tuning round
MAX_LOCALIZED_TRIGGERS = 8  # triggers "agreement" fits NeMo and Wanda on, one by one
MAX_LIST = 1000  # any other list in a configuration (radii, reference prompts, targets, ...)
MAX_PROMPT_CHARS = 1000  # a longer prompt is refused before it is tokenized
# An embedding or image input beyond this magnitude is refused: CLIP token embeddings stay below a few hundred,
# and a search from a start of 1e30 only returns NaN.
MAX_INPUT_MAGNITUDE = 1e4
MAX_GUIDANCE = 50  # the app's guidance fields (far above any useful scale)
MAX_RUN_SECONDS = 1800  # the app's default limit on one request's run time (`app.py --max-run-seconds`)
MAX_UPLOAD_BYTES = 64 * 2**20  # the app's limit on one uploaded file

# What the front ends read from files and the network is bounded here too: a memorized set, `dori memorized
# fetch`'s downloads and `dori rerun`'s ZIPs (an export's per-member limits are `analysis.export`'s MAX_*).
MAX_SET_ROWS = 1000  # images of one memorized set (SD v1.4's list has 500); each is kept at the model's size
MAX_SET_IMAGE_PIXELS = 8192 * 8192  # pixels of one image of a memorized set, read from its header before decoding
MAX_FETCH_SECONDS = 600  # the largest `dori memorized fetch --timeout` (per read) and `--deadline` (per image)
MAX_FETCH_BYTES = 256 * 2**20  # the largest `--max-mb` of one downloaded image
MAX_FETCH_RETRIES = 10  # the most `--retries` of one image
MAX_REDIRECTS = 5  # redirects followed for one image
MAX_EXPORT_DECODED_BYTES = 2 * 2**30  # an export's images (as float32 tensors) and tensors together, once decoded
