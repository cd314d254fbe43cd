// kimi-schema-grammar: JSON schemas in, GBNF rules out, by llama.cpp's own converter (the
// one llama-server applies to `response_format`), so our grammars for forced tool calls and
// JSON answers accept exactly what llama.cpp's schema support accepts.
//
//   stdin:  {"schemas": {"NAME": <JSON schema>, ...}}
//   stdout: {"grammar": "<GBNF rules, no root>", "rules": {"NAME": "<rule matching NAME>"}}
//   exit 2 with the converter's message on stderr when a schema is outside its subset.
#include "json-schema-to-grammar.h"
#include "json-schema.h"
#include "json.h"

#include <nlohmann/json.hpp>

#include <iostream>
#include <list>
#include <stdexcept>
#include <string>

using json = nlohmann::ordered_json;

int main() {
    try {
        const json in = json::parse(std::cin);
        std::list<common_chat_schema_document> docs;  // the converter keeps pointers into them
        json rules = json::object();
        const std::string grammar = build_grammar([&](const common_grammar_builder & builder) {
            for (const auto & [name, schema] : in.at("schemas").items()) {
                docs.push_back(common_chat_schema_from_json(common_json::parse(schema.dump())));
                rules[name] = builder.add_schema(name, *docs.back().root);
            }
        });
        std::cout << json{{"grammar", grammar}, {"rules", rules}}.dump() << std::endl;
        return 0;
    } catch (const std::exception & e) {
        std::cerr << e.what() << std::endl;
        return 2;
    }
}
