"""A coarser granularity of topics: each fine topic to the family whose patterns it matches (shell-style, e.g.
`comp.*`). A YAML file holds it under `coarse_topics`, as the study's corpus files do:

    coarse_topics:
      comp: [comp.*]
      religion: [alt.atheism, soc.religion.christian, talk.religion.misc]

Every topic must match exactly one family: a topic left out, or claimed twice, is refused in one line.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import yaml

from config_utils import PipelineError
from config_utils.config import read_yaml

KEY = "coarse_topics"


def check_topic_map(topic_map, where: str) -> dict[str, list[str]]:
    """The map itself: family names to non-empty lists of patterns."""
    if not isinstance(topic_map, dict) or not topic_map:
        raise PipelineError(f"{where}: {KEY} must map each family to a list of topic patterns, got {topic_map!r}")
    for family, patterns in topic_map.items():
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise PipelineError(f"{where}: {KEY}.{family} must be a non-empty list of topic patterns, got {patterns!r}")
    return {str(family): list(patterns) for family, patterns in topic_map.items()}


def read_topic_map(path: Path, option: str = "--topic-map") -> dict[str, list[str]]:
    """The `coarse_topics` of a YAML file (a corpus file of configs/corpora/ has one where its topics nest); option
    names where the path came from in an error (step 4's --topic-map, train.router_topic_map)."""
    try:
        raw = read_yaml(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise PipelineError(f"{option} {path}: cannot be read ({error.strerror}); check the path") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise PipelineError(f"{option} {path}: not valid YAML{line}; fix the file") from None
    if not isinstance(raw, dict) or KEY not in raw:
        raise PipelineError(f"{option} {path}: no {KEY} key (e.g. configs/corpora/20newsgroups.yaml has one)")
    return check_topic_map(raw[KEY], str(path))


def coarse_topics(topics, topic_map: dict[str, list[str]], where: str) -> dict[str, str]:
    """Each topic's family; refuses a topic that matches no family, or more than one."""
    families = {}
    for topic in sorted(set(topics)):
        matched = [family for family, patterns in topic_map.items() if any(fnmatchcase(topic, p) for p in patterns)]
        if len(matched) != 1:
            what = "no family" if not matched else f"{len(matched)} families ({', '.join(matched)})"
            raise PipelineError(f"{where}: topic {topic!r} matches {what}; every topic needs exactly one")
        families[topic] = matched[0]
    return families
