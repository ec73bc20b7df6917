"""Numbers of the architecture spec (shared/design/gemma4-architecture.md), written once for every test that checks
against them. Each comment names the table."""

# §7.1 "total, JAX tree" (the official tree, with the unused K/V of KV-shared readers) and "total, HF tree"
TOTAL_JAX = {"e2b": 5_123_178_851, "e4b": 7_996_157_290, "31b": 31_273_088_876, "26b_a4b": 25_805_936_206}
TOTAL_HF = {"e2b": 5_104_298_339, "e4b": 7_941_101_674, "31b": 31_273_088_876, "26b_a4b": 25_805_936_206}
# §7.1 text decoder (HF tree), without the PLE table, without PLE table and token embedding
TEXT_HF = {"e2b": 4_628_569_379, "e4b": 7_463_013_418, "31b": 30_697_345_340, "26b_a4b": 25_233_141_790}
TEXT_NO_PLE = {"e2b": 2_279_759_139, "e4b": 4_644_441_130, "31b": 30_697_345_340, "26b_a4b": 25_233_141_790}
TEXT_NO_PLE_NO_EMBED = {"e2b": 1_877_105_955, "e4b": 3_973_352_490, "31b": 29_288_059_196, "26b_a4b": 24_494_944_286}
# §7.1 parts
TOKEN_EMBED = {"e2b": 402_653_184, "e4b": 671_088_640, "31b": 1_409_286_144, "26b_a4b": 738_197_504}
PLE_TABLE = {"e2b": 2_348_810_240, "e4b": 2_818_572_288, "31b": 0, "26b_a4b": 0}
VISION_ENCODER = {"e2b": 167_364_928, "e4b": 167_364_928, "31b": 569_550_384, "26b_a4b": 569_550_384}
AUDIO_ENCODER = {"e2b": 304_825_088, "e4b": 304_825_088, "31b": 0, "26b_a4b": 0}
MM_PROJECTIONS = {"e2b": 3_538_944, "e4b": 5_898_240, "31b": 6_193_152, "26b_a4b": 3_244_032}
UNUSED_READER_KV = {"e2b": 18_880_512, "e4b": 55_055_616, "31b": 0, "26b_a4b": 0}
# §2.4 (E2B / E4B): encoder + its projection
VISION_WITH_PROJECTION = {"e2b": 168_544_576, "e4b": 169_331_008}
AUDIO_WITH_PROJECTION = {"e2b": 307_184_384, "e4b": 308_757_248}
# §7.2: context -> (uncapped, W-capped) bf16 KV-cache MiB per batch element, and bytes per token (owning layers)
KV_MIB = {
    "e2b": {4096: (72.0, 30.0), 32768: (576, 198), 131072: (2304, 774)},
    "e4b": {4096: (224, 84), 32768: (1792, 532), 131072: (7168, 2068)},
    "31b": {4096: (3520, 1120), 32768: (28160, 3360), 131072: (112640, 11040), 262144: (225280, 21280)},
    "26b_a4b": {4096: (880, 280), 32768: (7040, 840), 131072: (28160, 2760), 262144: (56320, 5320)},
}
KV_BYTES_PER_TOKEN = {"e2b": 18_432, "e4b": 57_344, "31b": 901_120, "26b_a4b": 225_280}
