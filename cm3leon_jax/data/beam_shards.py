"""The shard stage of `cm3leon prepare` on Apache Beam (`prepare.runner: beam`).

The unit of work is one shard: a Beam worker reads the shard's records in the chunks of
`ShardPlan` (the local runner's chunks), tokenizes captions, encodes images in batches with
the prepared directory's image tokenizer (on the worker's accelerator when it has one) and
writes the shard and its counts file, exactly as the local runner does, so the shards are
byte-identical whatever the runner and however many workers. Tokenizers are fitted first,
in the launching process, on a sample (as in the local runner), and the manifest is written
there after the pipeline, from the counts files.

`prepare.beam_options` are Beam pipeline flags as on a command line: locally
`--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing`; on a
cluster `--runner=DataflowRunner --project=... --region=... --temp_location=gs://...` (with
data.dir and the source on cloud storage, and this package installed on the workers, e.g.
`--setup_file=./setup.py`), or Flink/Spark runner flags.
"""

from __future__ import annotations

import collections

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from cm3leon_jax.config import Config
from cm3leon_jax.data import readers
from cm3leon_jax.data.shards import ShardPlan, write_one_shard
from cm3leon_jax.layout import DataDir
from cm3leon_jax.tokenizers.image import ImageTokenizer


class _WriteShard(beam.DoFn):
    """Shard index -> the shard written; yields (index, documents)."""

    def __init__(self, plan: ShardPlan, source, text_model: bytes, cfg: Config):
        self.plan, self.source, self.text_model, self.cfg = plan, source, text_model, cfg

    def setup(self):
        """Once per worker: the readers' state and the image tokenizer (one compile)."""
        self.image = ImageTokenizer.load(DataDir(self.plan.root).image_tokenizer,
                                         batch_size=self.cfg.prepare.batch_size)
        self.vocab = self.cfg.vocab.build()
        readers.init(self.source, self.text_model, self.image.resolution)

    def process(self, i: int):
        results = readers.ordered_chunks(None, self.plan.chunks(i), window=1)
        shard = write_one_shard(self.plan, i, results, self.image, self.vocab,
                                collections.Counter(), None)
        yield i, shard["documents"]


def run(plan: ShardPlan, todo: list[int], source, text_model: bytes, cfg: Config,
        progress: bool) -> None:
    """Write the shards `todo` of `plan` on the Beam runner `cfg.prepare.beam_options` says."""
    options = PipelineOptions(list(cfg.prepare.beam_options))
    with beam.Pipeline(options=options) as p:
        written = (p | "shards" >> beam.Create(todo)
                   | "spread" >> beam.Reshuffle()  # one shard per worker at a time
                   | "write" >> beam.ParDo(_WriteShard(plan, source, text_model, cfg)))
        if progress:
            written | "log" >> beam.Map(lambda r: print(f"prepare (beam): shard {r[0]} "
                                                        f"written, {r[1]} documents",
                                                        flush=True))
