"""The examples under each subcommand's ``--help`` (:mod:`utils_cv.similarity.cli`)."""

EXAMPLES = {
    "index": "examples:\n  utils-cv-similarity index ~/Pictures --out ~/pictures.idx\n"
             "  utils-cv-similarity index photos/ --out photos.idx --model model.pth --backend hnsw\n"
             "  utils-cv-similarity index ~/Pictures --out ~/pictures.idx --runtime openvino",
    "query": "examples:\n  utils-cv-similarity query ~/pictures.idx beach.jpg -k 5\n"
             "  utils-cv-similarity query photos.idx a.jpg b.jpg --json --figure neighbours.png",
    "duplicates": "examples:\n  utils-cv-similarity duplicates ~/Pictures\n"
                  "  utils-cv-similarity duplicates photos.idx --threshold 0.4 --csv > dups.csv\n"
                  "  utils-cv-similarity duplicates ~/Pictures --json --figure groups.png --keep oldest",
    "serve": "examples:\n  utils-cv-similarity serve ~/pictures.idx\n"
             "  utils-cv-similarity serve photos.idx --host 0.0.0.0 --port 8080",
    "train": "examples:\n  utils-cv-similarity train labelled/ --out model.pth\n"
             "  utils-cv-similarity train labelled/ --out model.pth --head normsoftmax --epochs 12\n"
             "  utils-cv-similarity train labelled/ --out model.pth --class-scores  # to search these classes\n"
             "  utils-cv-similarity train labelled/ --out model.pth --head metric --loss proxyanchor\n"
             "  utils-cv-similarity train labelled/ --out model.pth --valid-classes --ensemble  # to search others",
    "evaluate": "examples:\n  utils-cv-similarity evaluate labelled/\n"
                "  utils-cv-similarity evaluate labelled/ --model model.pth --json",
    "demo": "examples:\n  utils-cv-similarity demo\n  utils-cv-similarity demo --epochs 0 --data my_labelled_folder",
}
