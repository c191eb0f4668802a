"""Language codes and names: what a request may say, and what a response reports.

Every engine speaks ISO 639 codes (``en``, ``zh``, ``yue``); clients may also name a language
(``English``, ``chinese``: the blog recipes and Qwen3-ASR's own client send names) or ask for
detection with ``auto``. ``to_code`` is the one place that reads a client's language.
"""
from __future__ import annotations

DETECT = ("", "auto")  # what asks for detection

# Whisper's language names, as OpenAI's verbose_json reports them ("english", not "en"), and the one
# Qwen3-ASR language Whisper lacks (Filipino).
LANGUAGE_NAMES = {
    'en': 'english', 'zh': 'chinese', 'de': 'german', 'es': 'spanish', 'ru': 'russian', 'ko': 'korean',
    'fr': 'french', 'ja': 'japanese', 'pt': 'portuguese', 'tr': 'turkish', 'pl': 'polish', 'ca': 'catalan',
    'nl': 'dutch', 'ar': 'arabic', 'sv': 'swedish', 'it': 'italian', 'id': 'indonesian', 'hi': 'hindi',
    'fi': 'finnish', 'vi': 'vietnamese', 'he': 'hebrew', 'uk': 'ukrainian', 'el': 'greek', 'ms': 'malay',
    'cs': 'czech', 'ro': 'romanian', 'da': 'danish', 'hu': 'hungarian', 'ta': 'tamil', 'no': 'norwegian',
    'th': 'thai', 'ur': 'urdu', 'hr': 'croatian', 'bg': 'bulgarian', 'lt': 'lithuanian', 'la': 'latin',
    'mi': 'maori', 'ml': 'malayalam', 'cy': 'welsh', 'sk': 'slovak', 'te': 'telugu', 'fa': 'persian',
    'lv': 'latvian', 'bn': 'bengali', 'sr': 'serbian', 'az': 'azerbaijani', 'sl': 'slovenian', 'kn': 'kannada',
    'et': 'estonian', 'mk': 'macedonian', 'br': 'breton', 'eu': 'basque', 'is': 'icelandic', 'hy': 'armenian',
    'ne': 'nepali', 'mn': 'mongolian', 'bs': 'bosnian', 'kk': 'kazakh', 'sq': 'albanian', 'sw': 'swahili',
    'gl': 'galician', 'mr': 'marathi', 'pa': 'punjabi', 'si': 'sinhala', 'km': 'khmer', 'sn': 'shona',
    'yo': 'yoruba', 'so': 'somali', 'af': 'afrikaans', 'oc': 'occitan', 'ka': 'georgian', 'be': 'belarusian',
    'tg': 'tajik', 'sd': 'sindhi', 'gu': 'gujarati', 'am': 'amharic', 'yi': 'yiddish', 'lo': 'lao',
    'uz': 'uzbek', 'fo': 'faroese', 'ht': 'haitian creole', 'ps': 'pashto', 'tk': 'turkmen', 'nn': 'nynorsk',
    'mt': 'maltese', 'sa': 'sanskrit', 'lb': 'luxembourgish', 'my': 'myanmar', 'bo': 'tibetan',
    'tl': 'tagalog', 'mg': 'malagasy', 'as': 'assamese', 'tt': 'tatar', 'haw': 'hawaiian', 'ln': 'lingala',
    'ha': 'hausa', 'ba': 'bashkir', 'jw': 'javanese', 'su': 'sundanese', 'yue': 'cantonese',
    'fil': 'filipino',
}

_CODES_BY_NAME = {name: code for code, name in LANGUAGE_NAMES.items()}


def to_code(value: str) -> str | None:
    """The ISO code ``value`` names (a code or a language name, any case); None for detection.
    An unknown value comes back lower-cased for the caller to refuse with the engine's languages."""
    value = value.strip().lower()
    if value in DETECT:
        return None
    return _CODES_BY_NAME.get(value, value)
