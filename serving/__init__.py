"""TF Serving configuration and clients for tf-limaml exports.

`serving.client` holds a gRPC client (`GrpcClient`, through
`tensorflow_serving.apis`) and a REST client (`RestClient`) for the
`serving_default` and `adapt_and_predict` signatures. `models.config` in this
directory is an example TF Serving model config; the request batching
parameters ship with the export (`tf_limaml/export/batching_parameters.txt`),
and `limaml serve-command` prints commands that use them.
"""
