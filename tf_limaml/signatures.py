"""Names of the export's signatures and of their inputs and outputs.

The one definition that the export (`tf_limaml.export`), the clients
(`serving.client`) and the offline job (`beam_pipelines.generate_embeddings`)
read. It imports no TensorFlow, so a client process that only sends requests
never pays for it. `META_EMBEDDING_KEY` is also the key under which the
global block receives the meta embedding beside the request features: the
signatures take and return it under the same name.

| signature | inputs | outputs |
| --- | --- | --- |
| `serving_default` | `meta_embedding` [B, d], request features [B] | `score` [B] |
| `adapt_and_predict` | meta features, `support_<f>` [S], `support_label` [S], `query_<f>` [Q] | `score` [Q], `meta_embedding` [d] |
| `meta_embedding` | meta features [E], `support_<f>` [E, S], `support_label`, `support_mask` [E, S] | `meta_embedding` [E, d] |
| `predict_examples` | `examples` [B] (serialized tf.Example) | `score` [B] |

Per-interaction inputs are named `FeatureSpec.batch_key(part, feature)`, that
is `support_<feature>` and `query_<feature>`; see `support_key` and `query_key`.

Example:

    from tf_limaml import signatures

    request.model_spec.signature_name = signatures.SERVING_DEFAULT
    score = response.outputs[signatures.SCORE_KEY]
"""

from __future__ import annotations

from tf_limaml.features import LABEL_KEY, MASK_KEY, QUERY, SUPPORT, FeatureSpec

SERVING_DEFAULT = "serving_default"
ADAPT_AND_PREDICT = "adapt_and_predict"
META_EMBEDDING = "meta_embedding"
PREDICT_EXAMPLES = "predict_examples"
SIGNATURE_NAMES = (SERVING_DEFAULT, ADAPT_AND_PREDICT, META_EMBEDDING, PREDICT_EXAMPLES)

# The meta embedding's key: an input of the global block (beside the request
# features), an input of serving_default and an output of the adaptation
# signatures. Defined here only; the model, the blocks and the export read it.
META_EMBEDDING_KEY = "meta_embedding"

# Output keys.
SCORE_KEY = "score"
# The name the signatures' callers (clients, benchmarks) know the key by.
EMBEDDING_KEY = META_EMBEDDING_KEY
# Input keys besides the feature names.
EXAMPLES_KEY = "examples"
SUPPORT_LABEL_KEY = FeatureSpec.batch_key(SUPPORT, LABEL_KEY)
SUPPORT_MASK_KEY = FeatureSpec.batch_key(SUPPORT, MASK_KEY)

# Output names by signature. TF Serving's REST API drops the name when a
# signature has a single output, so a client restores it from here.
OUTPUT_NAMES = {
    SERVING_DEFAULT: (SCORE_KEY,),
    ADAPT_AND_PREDICT: (SCORE_KEY, META_EMBEDDING_KEY),
    META_EMBEDDING: (META_EMBEDDING_KEY,),
    PREDICT_EXAMPLES: (SCORE_KEY,),
}


def support_key(feature: str) -> str:
    """The input name of a request feature's support rows, e.g. "support_item_id"."""
    return FeatureSpec.batch_key(SUPPORT, feature)


def query_key(feature: str) -> str:
    """The input name of a request feature's query rows, e.g. "query_item_id"."""
    return FeatureSpec.batch_key(QUERY, feature)
