//! A tiny element tree over quick-xml: libvirt's domain and snapshot XML are small, so the
//! daemon reads them into [`Element`]s, queries them by local name, edits them, and writes
//! them back. Every attribute value and text node goes through quick-xml's escaping writer:
//! user input never reaches the XML by string concatenation.

use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer, XmlVersion};

/// Why a document could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("malformed XML: {0}")]
    Parse(String),
    #[error("the document has no root element")]
    NoRoot,
    #[error("unknown entity &{0};")]
    Entity(String),
    #[error("could not write XML: {0}")]
    Write(String),
}

/// One element: its qualified name (prefix kept so namespaced metadata round-trips), its
/// attributes in document order, its text (whitespace-only text dropped) and its children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    pub fn new(name: &str) -> Self {
        Element {
            name: name.to_string(),
            ..Element::default()
        }
    }

    /// Builder: adds an attribute.
    pub fn attr(mut self, key: &str, value: impl Into<String>) -> Self {
        self.attrs.push((key.to_string(), value.into()));
        self
    }

    /// Builder: sets the text.
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.text = text.into();
        self
    }

    /// Builder: appends a child.
    pub fn child(mut self, child: Element) -> Self {
        self.children.push(child);
        self
    }

    /// The name without its namespace prefix.
    pub fn local_name(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    pub fn get_attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first child with this local name.
    pub fn find(&self, local: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.local_name() == local)
    }

    /// Every child with this local name.
    pub fn find_all<'a>(&'a self, local: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children
            .iter()
            .filter(move |c| c.local_name() == local)
    }

    /// Follows a `/`-separated path of local names from this element.
    pub fn path(&self, path: &str) -> Option<&Element> {
        path.split('/').try_fold(self, |el, part| el.find(part))
    }

    /// The text of the element at `path`, if present.
    pub fn path_text(&self, path: &str) -> Option<&str> {
        self.path(path).map(|e| e.text.as_str())
    }

    /// Reads a document and returns its root element.
    pub fn parse(xml: &str) -> Result<Element, XmlError> {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<Element> = Vec::new();
        let mut root = None;
        loop {
            let event = reader
                .read_event()
                .map_err(|e| XmlError::Parse(e.to_string()))?;
            match event {
                Event::Start(start) => stack.push(open(&start)?),
                Event::Empty(start) => {
                    let el = open(&start)?;
                    close(&mut stack, &mut root, el);
                }
                Event::End(_) => {
                    let el = stack.pop().ok_or(XmlError::NoRoot)?;
                    close(&mut stack, &mut root, el);
                }
                Event::Text(text) => {
                    if let Some(top) = stack.last_mut() {
                        top.text
                            .push_str(&text.xml_content(XmlVersion::Implicit1_0));
                    }
                }
                Event::CData(data) => {
                    if let Some(top) = stack.last_mut() {
                        top.text
                            .push_str(&data.xml_content(XmlVersion::Implicit1_0));
                    }
                }
                Event::GeneralRef(reference) => {
                    let resolved = match reference.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        _ => {
                            let name: &str = reference.as_ref();
                            let name = name.to_string();
                            resolve_predefined_entity(&name)
                                .ok_or(XmlError::Entity(name))?
                                .to_string()
                        }
                    };
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&resolved);
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        root.ok_or(XmlError::NoRoot)
    }

    /// Writes this element as a document (indented, no declaration).
    pub fn to_xml(&self) -> Result<String, XmlError> {
        let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
        write_element(&mut writer, self).map_err(|e| XmlError::Write(e.to_string()))?;
        String::from_utf8(writer.into_inner()).map_err(|e| XmlError::Write(e.to_string()))
    }
}

fn open(start: &BytesStart<'_>) -> Result<Element, XmlError> {
    let mut el = Element::new(start.name().as_ref());
    for attr in start.attributes() {
        let attr = attr.map_err(|e| XmlError::Parse(e.to_string()))?;
        let key = attr.key.as_ref().to_string();
        let value = attr
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| XmlError::Parse(e.to_string()))?;
        el.attrs.push((key, value.into_owned()));
    }
    Ok(el)
}

fn close(stack: &mut [Element], root: &mut Option<Element>, mut el: Element) {
    if el.text.trim().is_empty() {
        el.text.clear();
    }
    match stack.last_mut() {
        Some(parent) => parent.children.push(el),
        None => *root = Some(el),
    }
}

fn write_element(writer: &mut Writer<Vec<u8>>, el: &Element) -> std::io::Result<()> {
    let builder = writer
        .create_element(el.name.as_str())
        .with_attributes(el.attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if el.children.is_empty() && el.text.is_empty() {
        builder.write_empty()?;
    } else if el.children.is_empty() {
        builder.write_text_content(BytesText::new(&el.text))?;
    } else {
        builder.write_inner_content(|w| {
            if !el.text.is_empty() {
                w.write_event(Event::Text(BytesText::new(&el.text)))?;
            }
            for child in &el.children {
                write_element(w, child)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn hostile_text_and_attributes_are_escaped_and_round_trip() {
        let evil = "a'b\"c<d>&e</name><devices>";
        let doc = Element::new("domain")
            .child(Element::new("name").text(evil))
            .child(Element::new("label").attr("key", evil).text("x"));
        let xml = doc.to_xml().unwrap();
        assert!(!xml.contains("</name><devices>"), "{xml}");
        let back = Element::parse(&xml).unwrap();
        assert_eq!(back, doc);
        assert_eq!(back.find_all("name").count(), 1);
    }

    #[test]
    fn parse_resolves_entities_and_char_refs() {
        let el = Element::parse("<a x='1&amp;2'>b&amp;c&#65;<q:b/></a>").unwrap();
        assert_eq!(el.text, "b&cA");
        assert_eq!(el.get_attr("x"), Some("1&2"));
        assert_eq!(el.find("b").map(|b| b.name.as_str()), Some("q:b"));
    }

    #[test]
    fn parse_rejects_unknown_entities_and_garbage() {
        assert!(Element::parse("<a>&nope;</a>").is_err());
        assert!(Element::parse("").is_err());
        assert!(Element::parse("<a><b></a>").is_err());
    }
}
