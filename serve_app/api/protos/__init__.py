"""Generated gRPC code for chatglm2.proto (regenerate with scripts/gen_protos.sh; never edit by hand)."""
