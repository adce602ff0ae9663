//! A word-level tokenizer built from the Shapes world's vocabulary, CLIP-style, readable and
//! writable in the Hugging Face tokenizers `tokenizer.json` format.
//!
//! Ids: 0 is `<|startoftext|>` (bos), 1 is `<|endoftext|>` (eos, also the padding token, as in
//! CLIP), 2 is `<|unk|>`, then the world's words: those of its first version sorted, then the
//! words later harm categories added, sorted, so earlier ids never move. An encoding is
//! `[bos, words..., eos, eos...]` padded to `max_length` (default 16). Text is lowercased and split
//! at whitespace.
//!
//! Differences from the Python tokenizer loaded from the same file, on purpose: an unknown word is
//! an error naming it here, while Python maps it to `<|unk|>` (the file needs an `unk_token`); a
//! prompt longer than `max_length - 2` words is an error here, while Python returns the longer
//! sequence (the file sets no truncation, so nothing is cut silently there either).
//!
//! The eos id is 1, not 2: transformers' `CLIPTextModel` pools the hidden state at the first eos
//! (`input_ids == eos_token_id`) unless `eos_token_id == 2`, where it falls back to the legacy
//! argmax of the ids.

use crate::prompts::vocabulary_by_id;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use tiller_core::{Error, Result};

/// The beginning-of-text token.
pub const BOS: &str = "<|startoftext|>";
/// The end-of-text token, also used for padding.
pub const EOS: &str = "<|endoftext|>";
/// The unknown-word token; present for the Hugging Face format, never produced by [`Tokenizer`].
pub const UNK: &str = "<|unk|>";
/// Default sequence length, bos and eos included (the longest world prompt has 14 words).
pub const DEFAULT_MAX_LENGTH: usize = 16;

/// A word-level tokenizer with CLIP's special tokens and fixed-length padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenizer {
    /// Token strings by id.
    tokens: Vec<String>,
    /// Id by token string.
    ids: HashMap<String, u32>,
    bos: u32,
    eos: u32,
    unk: u32,
    max_length: usize,
}

impl Tokenizer {
    /// The Shapes world's tokenizer: specials then [`vocabulary_by_id`], length
    /// [`DEFAULT_MAX_LENGTH`].
    pub fn shapes() -> Self {
        let mut tokens: Vec<String> = [BOS, EOS, UNK].map(String::from).to_vec();
        tokens.extend(vocabulary_by_id().into_iter().map(String::from));
        Self::from_tokens(tokens, 0, 1, 2, DEFAULT_MAX_LENGTH)
            .expect("the built-in vocabulary has no duplicates and fits")
    }

    fn from_tokens(
        tokens: Vec<String>,
        bos: u32,
        eos: u32,
        unk: u32,
        max_length: usize,
    ) -> Result<Self> {
        let mut ids = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            if ids.insert(t.clone(), i as u32).is_some() {
                return Err(Error::invalid(format!(
                    "token {t:?} appears twice in the vocabulary"
                )));
            }
        }
        let n = tokens.len() as u32;
        if bos >= n || eos >= n || unk >= n {
            return Err(Error::invalid(
                "special token ids must lie inside the vocabulary",
            ));
        }
        if max_length < 3 {
            return Err(Error::invalid(format!(
                "max_length {max_length} leaves no room for a word between bos and eos"
            )));
        }
        Ok(Self {
            tokens,
            ids,
            bos,
            eos,
            unk,
            max_length,
        })
    }

    /// Number of tokens, specials included.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Sequence length of every encoding.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of the bos token.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// Id of the eos token (also the padding id).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Id of the padding token (the eos token, as in CLIP).
    pub fn pad_id(&self) -> u32 {
        self.eos
    }

    /// The token with id `id`.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// `[bos, words..., eos]` padded with eos to [`Self::max_length`]. Errors name an unknown
    /// word, or give the word count of a prompt that does not fit.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = vec![self.bos];
        let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
        if words.len() + 2 > self.max_length {
            return Err(Error::invalid(format!(
                "prompt \"{text}\" has {} words; at most {} fit in {} tokens with bos and eos",
                words.len(),
                self.max_length - 2,
                self.max_length
            )));
        }
        for w in &words {
            let id = self
                .ids
                .get(w)
                .copied()
                .filter(|id| *id != self.bos && *id != self.eos && *id != self.unk);
            match id {
                Some(id) => out.push(id),
                None => {
                    return Err(Error::invalid(format!(
                        "unknown word \"{w}\" in prompt \"{text}\"; the tokenizer knows {} words",
                        self.tokens.len() - 3
                    )));
                }
            }
        }
        out.resize(self.max_length, self.eos);
        // The first pad is the eos that closes the text.
        Ok(out)
    }

    /// Index of the closing eos in an encoding (where CLIP pools).
    pub fn eos_position(&self, ids: &[u32]) -> Option<usize> {
        ids.iter().position(|&i| i == self.eos)
    }

    /// The words of an encoding, specials dropped, joined by spaces.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut words = Vec::new();
        for &id in ids {
            if id == self.bos || id == self.eos || id == self.unk {
                continue;
            }
            words.push(
                self.token(id)
                    .ok_or_else(|| Error::invalid(format!("token id {id} is out of range")))?,
            );
        }
        Ok(words.join(" "))
    }

    /// The `tokenizer_config.json` that lets transformers' `AutoTokenizer.from_pretrained` load
    /// the folder holding [`Self::to_json`]'s file as a `PreTrainedTokenizerFast` with its
    /// special tokens and length.
    pub fn to_config_json(&self) -> String {
        let t = |id: u32| self.tokens[id as usize].clone();
        let v = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": t(self.bos),
            "eos_token": t(self.eos),
            "pad_token": t(self.eos),
            "unk_token": t(self.unk),
            "model_max_length": self.max_length,
            "padding_side": "right",
        });
        serde_json::to_string_pretty(&v).expect("a JSON value serialises")
    }

    /// The tokenizer in Hugging Face's `tokenizer.json` format (pretty-printed).
    pub fn to_json(&self) -> String {
        let special = |id: u32| AddedToken {
            id,
            content: self.tokens[id as usize].clone(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: true,
        };
        let bos = &self.tokens[self.bos as usize];
        let eos = &self.tokens[self.eos as usize];
        let piece = |kind: &str, id: &str, type_id: u32| {
            let mut outer = serde_json::Map::new();
            outer.insert(
                kind.to_string(),
                serde_json::json!({ "id": id, "type_id": type_id }),
            );
            Value::Object(outer)
        };
        let special_entry =
            |name: &str, id: u32| serde_json::json!({ "id": name, "ids": [id], "tokens": [name] });
        let mut special_tokens = serde_json::Map::new();
        special_tokens.insert(bos.clone(), special_entry(bos, self.bos));
        special_tokens.insert(eos.clone(), special_entry(eos, self.eos));
        let file = TokenizerFile {
            version: "1.0".into(),
            truncation: Value::Null,
            padding: Some(Padding {
                strategy: serde_json::json!({ "Fixed": self.max_length }),
                direction: "Right".into(),
                pad_to_multiple_of: None,
                pad_id: self.eos,
                pad_type_id: 0,
                pad_token: eos.clone(),
            }),
            added_tokens: vec![special(self.bos), special(self.eos), special(self.unk)],
            normalizer: serde_json::json!({ "type": "Lowercase" }),
            pre_tokenizer: serde_json::json!({ "type": "WhitespaceSplit" }),
            post_processor: serde_json::json!({
                "type": "TemplateProcessing",
                "single": [
                    piece("SpecialToken", bos, 0),
                    piece("Sequence", "A", 0),
                    piece("SpecialToken", eos, 0),
                ],
                "pair": [
                    piece("SpecialToken", bos, 0),
                    piece("Sequence", "A", 0),
                    piece("SpecialToken", eos, 0),
                    piece("Sequence", "B", 1),
                    piece("SpecialToken", eos, 1),
                ],
                "special_tokens": Value::Object(special_tokens),
            }),
            decoder: Value::Null,
            model: Model {
                kind: "WordLevel".into(),
                vocab: Vocab(self.tokens.clone()),
                unk_token: self.tokens[self.unk as usize].clone(),
            },
        };
        let mut text = serde_json::to_string_pretty(&file).expect("plain data serialises");
        text.push('\n');
        text
    }

    /// Reads a `tokenizer.json` written by [`Self::to_json`] or by Python's `tokenizers` with the
    /// same pipeline; `path` names the source in errors. Anything else (another model type,
    /// normaliser, pre-tokenizer, template or padding) is an error saying what was found.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |m: String| Error::format(path, m);
        let file: TokenizerFile = serde_json::from_str(text)
            .map_err(|e| bad(format!("not a tokenizer.json this tokenizer reads: {e}")))?;
        if file.model.kind != "WordLevel" {
            return Err(bad(format!(
                "model type {:?}, expected \"WordLevel\"",
                file.model.kind
            )));
        }
        let type_of = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_string);
        if type_of(&file.normalizer).as_deref() != Some("Lowercase") {
            return Err(bad(format!(
                "normalizer {}, expected {{\"type\": \"Lowercase\"}}",
                file.normalizer
            )));
        }
        match type_of(&file.pre_tokenizer).as_deref() {
            Some("WhitespaceSplit" | "Whitespace") => {}
            _ => {
                return Err(bad(format!(
                    "pre_tokenizer {}, expected WhitespaceSplit or Whitespace",
                    file.pre_tokenizer
                )));
            }
        }
        let tokens = file.model.vocab.0;
        let id_of = |t: &str| {
            tokens
                .iter()
                .position(|x| x == t)
                .map(|i| i as u32)
                .ok_or_else(|| bad(format!("token {t:?} is not in the vocabulary")))
        };
        let template = file
            .post_processor
            .get("single")
            .and_then(Value::as_array)
            .filter(|_| type_of(&file.post_processor).as_deref() == Some("TemplateProcessing"))
            .ok_or_else(|| {
                bad("post_processor must be a TemplateProcessing with a single template".into())
            })?;
        let special_at = |i: usize| {
            template
                .get(i)
                .and_then(|p| p.get("SpecialToken"))
                .and_then(|p| p.get("id"))
                .and_then(Value::as_str)
        };
        let is_sequence = template
            .get(1)
            .and_then(|p| p.get("Sequence"))
            .and_then(|p| p.get("id"))
            .and_then(Value::as_str)
            == Some("A");
        let (Some(bos), Some(eos), true, 3) =
            (special_at(0), special_at(2), is_sequence, template.len())
        else {
            return Err(bad(format!(
                "the single template must be [bos, $A, eos], found {}",
                Value::Array(template.clone())
            )));
        };
        let (bos, eos) = (id_of(bos)?, id_of(eos)?);
        let unk = id_of(&file.model.unk_token)?;
        let padding = file
            .padding
            .ok_or_else(|| bad("padding is missing; Tiller pads to a fixed length".into()))?;
        let max_length = padding
            .strategy
            .get("Fixed")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                bad(format!(
                    "padding strategy {}, expected {{\"Fixed\": n}}",
                    padding.strategy
                ))
            })? as usize;
        if padding.pad_id != eos || padding.direction != "Right" {
            return Err(bad(format!(
                "padding must be on the right with the eos id {eos}, found {} with id {}",
                padding.direction, padding.pad_id
            )));
        }
        Self::from_tokens(tokens, bos, eos, unk, max_length).map_err(|e| bad(e.to_string()))
    }

    /// Writes `tokenizer.json` to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()).map_err(|e| Error::io(path, e))
    }

    /// Reads a `tokenizer.json` from `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }
}

// ---- the file format ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct TokenizerFile {
    version: String,
    truncation: Value,
    padding: Option<Padding>,
    added_tokens: Vec<AddedToken>,
    normalizer: Value,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: Model,
}

#[derive(Serialize, Deserialize)]
struct Padding {
    strategy: Value,
    direction: String,
    pad_to_multiple_of: Option<u32>,
    pad_id: u32,
    pad_type_id: u32,
    pad_token: String,
}

#[derive(Serialize, Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

#[derive(Serialize, Deserialize)]
struct Model {
    #[serde(rename = "type")]
    kind: String,
    vocab: Vocab,
    unk_token: String,
}

/// Tokens by id; serialised as Hugging Face does, a `{token: id}` map in id order.
struct Vocab(Vec<String>);

impl Serialize for Vocab {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (i, t) in self.0.iter().enumerate() {
            map.serialize_entry(t, &i)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Vocab {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let map: HashMap<String, u32> = HashMap::deserialize(d)?;
        let mut tokens = vec![None; map.len()];
        for (t, id) in map {
            let slot = tokens.get_mut(id as usize).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "vocabulary ids must be 0..n, found {id} for {t:?}"
                ))
            })?;
            if slot.replace(t).is_some() {
                return Err(serde::de::Error::custom(format!(
                    "vocabulary id {id} is used twice"
                )));
            }
        }
        // Every slot is filled: n distinct ids below n.
        Ok(Vocab(tokens.into_iter().flatten().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_clip_style_and_names_unknown_words() {
        let t = Tokenizer::shapes();
        let ids = t.encode("A red   Circle").unwrap();
        assert_eq!(ids.len(), DEFAULT_MAX_LENGTH);
        assert_eq!(ids[0], 0);
        assert_eq!(t.eos_position(&ids), Some(4));
        assert!(ids[4..].iter().all(|&i| i == 1));
        assert_eq!(t.decode(&ids).unwrap(), "a red circle");
        let e = t.encode("a red hexagon").unwrap_err().to_string();
        assert!(e.contains("unknown word \"hexagon\""), "{e}");
        // The special tokens are not words.
        assert!(t.encode("<|unk|>").is_err());
        let long = ["circle"; 15].join(" ");
        let e = t.encode(&long).unwrap_err().to_string();
        assert!(e.contains("has 15 words; at most 14"), "{e}");
    }

    #[test]
    fn json_round_trip_and_strict_reading() {
        let t = Tokenizer::shapes();
        let text = t.to_json();
        let back = Tokenizer::from_json(&text, Path::new("tokenizer.json")).unwrap();
        assert_eq!(back, t);
        let other = text.replace("\"WordLevel\"", "\"BPE\"");
        let e = Tokenizer::from_json(&other, Path::new("x/tokenizer.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x/tokenizer.json") && e.contains("BPE"), "{e}");
        let other = text.replace("\"Fixed\": 16", "\"Fixed\": 2");
        assert!(Tokenizer::from_json(&other, Path::new("t.json")).is_err());
    }
}
