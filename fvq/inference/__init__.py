"""Using a tokenizer: one loader for every model source, the token file format, export, encode/decode pipelines.

* :mod:`~fvq.inference.loading`: :func:`load_model` reads an exported folder (``config.json`` + ``model.safetensors``),
  a training run folder (its newest checkpoint) or one training checkpoint; :func:`model_identity` names a model by
  its inference form, so tokens encoded with a run decode with its export.
* :mod:`~fvq.inference.tokens`: the token file (:class:`TokenFile`, :func:`save_tokens`, :func:`load_tokens`) and
  :func:`check_tokens`; token stores for the generator are written by :func:`encode_store` and read by
  :class:`fvq.data.tokens.TokenDataset`.
* :mod:`~fvq.inference.export`: :func:`export_model` (projector folded into the codebook) and :func:`verify_export`.
* :mod:`~fvq.inference.pipeline`: images -> tokens (:func:`encode_images`, :func:`iter_encoded`; with views and
  labels into a sharded store: :func:`encode_store`, :func:`iter_encoded_views`), tokens -> images
  (:func:`decode_tokens`, :func:`iter_decoded`, :func:`write_images`), both at once (:func:`reconstruct_images`).
* :mod:`~fvq.inference.generate`: a trained generator (:func:`load_generator`) and its tokenizer to images
  (:func:`generate_images`), and sample folders for the standard evaluators (:func:`sample_to_folder`, ``fvq sample``).
"""

from fvq.inference.export import (
    ExportReport,
    ExportVerificationError,
    OutputFolderNotEmptyError,
    describe_bytes,
    export_model,
    verify_export,
)
from fvq.inference.generate import (
    ForeignGeneratorError,
    LoadedGenerator,
    SamplingOptions,
    check_generator_tokenizer,
    generate_images,
    load_generator,
    plan_classes,
    sample_to_folder,
)
from fvq.inference.loading import (
    LoadedModel,
    config_digest,
    load_model,
    model_identity,
    resolve_device,
    weights_digest,
)
from fvq.inference.pipeline import (
    DEFAULT_SHARD_SIZE,
    EncodedBatch,
    EncodedViews,
    ImageSource,
    OutputsExistError,
    ReconstructionReport,
    StoreReport,
    collect_images,
    decode_tokens,
    encode_images,
    encode_store,
    existing_outputs,
    iter_decoded,
    iter_encoded,
    iter_encoded_views,
    labelled_images,
    output_names,
    reconstruct_images,
    write_images,
)
from fvq.inference.tokens import (
    TOKEN_FORMAT,
    TOKEN_FORMAT_VERSION,
    TOKEN_STORE_VERSION,
    ForeignTokensError,
    TokenFile,
    check_tokens,
    load_tokens,
    save_tokens,
)

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "EncodedBatch",
    "EncodedViews",
    "ExportReport",
    "ExportVerificationError",
    "ForeignGeneratorError",
    "ForeignTokensError",
    "ImageSource",
    "LoadedGenerator",
    "LoadedModel",
    "OutputFolderNotEmptyError",
    "OutputsExistError",
    "ReconstructionReport",
    "SamplingOptions",
    "StoreReport",
    "TOKEN_FORMAT",
    "TOKEN_FORMAT_VERSION",
    "TOKEN_STORE_VERSION",
    "TokenFile",
    "check_generator_tokenizer",
    "check_tokens",
    "collect_images",
    "config_digest",
    "decode_tokens",
    "describe_bytes",
    "encode_images",
    "encode_store",
    "existing_outputs",
    "export_model",
    "generate_images",
    "iter_decoded",
    "iter_encoded",
    "iter_encoded_views",
    "labelled_images",
    "load_generator",
    "load_model",
    "load_tokens",
    "model_identity",
    "output_names",
    "plan_classes",
    "reconstruct_images",
    "resolve_device",
    "sample_to_folder",
    "save_tokens",
    "verify_export",
    "weights_digest",
    "write_images",
]
