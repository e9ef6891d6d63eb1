"""Keys ground into one state bucket, found once offline (about 65,536 hashes each): what a client
must do to grow one bucket past what a chunk carries (ledger/state_tree.py)."""

from __future__ import annotations

GROUND_BUCKET = 0x1234
# Value keys whose bucket_of(VALUE, key) is GROUND_BUCKET: 70 of them, so the bucket has three pages.
GROUND_KEYS = [
    "g111814", "g173250", "g182624", "g184274", "g221665", "g272316", "g320152", "g327139", "g366850", "g453576",
    "g492864", "g551397", "g594462", "g684069", "g692303", "g891555", "g972029", "g985816", "g997714", "g1049733",
    "g1058397", "g1153970", "g1241906", "g1322336", "g1363533", "g1476951", "g1506034", "g1634389", "g1675563",
    "g1743214", "g1762230", "g1853675", "g1862727", "g1939499", "g1975906", "g2049381", "g2121191", "g2277720",
    "g2316301", "g2421404", "g2620150", "g2750916", "g2817383", "g2843184", "g2873511", "g2882319", "g2903896",
    "g2921728", "g2961612", "g2966345", "g2989603", "g3006246", "g3157617", "g3168803", "g3192037", "g3207181",
    "g3253286", "g3276447", "g3422768", "g3485480", "g3593172", "g3595356", "g3664975", "g3790266", "g3831630",
    "g3838863", "g3935405", "g3956854", "g3993739", "g4156868",
]
