"""The sandbox's FreeMarker subset must fail where FreeMarker fails, or client templates pass here and break live.

Each row is a template and the model it runs on, with the output or error FreeMarker gives (expensify.md §3, §9.2).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expensify_exact_sandbox.freemarker import (
    Template,
    TemplateError,
    TemplateSyntaxError,
    js_string,
    json_string,
    render,
)

MODEL = {
    "addHeader": True,
    "reports": [
        {"reportID": "R00abc", "total": 1234567, "approved": "2026-07-31 18:02:11", "reimbursed": "",
         "transactionList": [
             {"merchant": 'Café "De Kas"', "amount": 8675, "modifiedAmount": "", "reimbursable": True,
              "tag": "Amsterdam:P1001 Rijkswaterstaat", "receiptObject": {}, "rate": 0.9213},
             {"merchant": "Uber", "amount": -2290, "modifiedAmount": 2000, "reimbursable": False,
              "tag": "Utrecht:Internal", "receiptObject": {"url": "https://x/r.jpg"}, "rate": 1.0},
         ]},
    ],
    "nothing": None,
    "flag": False,
}

OUTPUT_CASES = [
    # numbers without ?c get en_US grouping and at most 3 decimals: the classic broken-JSON source
    ("${reports[0].total}", "1,234,567"),
    ("${reports[0].total?c}", "1234567"),
    ("${reports[0].total / 100}", "12,345.67"),
    ("${(reports[0].total / 100)?c}", "12345.67"),
    ("${reports[0].transactionList[0].rate}", "0.921"),
    ("${reports[0].transactionList[0].rate?c}", "0.9213"),
    ("${1/3}", "0.333"),
    ("${(1/3)?c}", "0.333333333333"),
    ("${-2290/100}", "-22.9"),
    ("${7 % 3}|${2 * 3 + 1}|${10 - 4}", "1|7|6"),
    ('${"n=" + 1234}', "n=1,234"),  # concatenation formats numbers too
    # booleans need ?c or ?string
    ("${reports[0].transactionList[0].reimbursable?c}", "true"),
    ('${flag?string("yes","no")}', "no"),
    ("${flag?string}", "false"),
    # lists, separators, loop variables, else
    ("<#list reports[0].transactionList as e>${e.amount?c}<#sep>,</#sep></#list>", "8675,-2290"),
    ("<#list reports[0].transactionList as e>${e.amount?c}<#sep>;</#list>", "8675;-2290"),
    ("<#list reports[0].transactionList as e>${e?index}:${e?has_next?c}:${e?is_last?c} </#list>",
     "0:true:false 1:false:true "),
    ("<#list [] as x>${x}<#else>empty</#list>", "empty"),
    ("<#list reports[0].transactionList><#items as e>${e.merchant?length}</#items><#else>none</#list>", "134"),
    ('<#list {"a": 1, "b": 2} as k, v>${k}=${v};</#list>', "a=1;b=2;"),
    ("<#list 1..3 as i>${i}</#list>", "123"),
    ("<#list [1, 2, 3] as i><#if i == 2><#break></#if>${i}</#list>", "1"),
    # conditionals, assignment, comments
    ("<#if reports?size gt 1>many<#elseif reports?size == 1>one<#else>none</#if>", "one"),
    ("<#if (reports?size > 0) && !flag || false>yes</#if>", "yes"),
    ("<#assign t = 0><#list reports[0].transactionList as e><#assign t = t + e.amount></#list>${t?c}", "6385"),
    ("<#assign x>cap ${reports[0].reportID}</#assign>${x}", "cap R00abc"),
    ("a<#-- ignored -->b", "ab"),
    # default operators and ??: without parentheses only the last step may be missing
    ('${reports[0].missing!"d"}', "d"),
    ("[${nothing!}]", "[]"),
    ('${(reports[0].transactionList[0].receiptObject.url)!"none"}', "none"),
    ('${reports[0].transactionList[1].receiptObject.url!"none"}', "https://x/r.jpg"),
    ('${(nope.deeper.still)!"safe"}', "safe"),
    ("${nothing???c}|${reports???c}", "false|true"),
    ("${x!1 + 2}", "3"),  # FreeMarker 2.3: the right side of ! swallows "1 + 2"
    ("<#list reports[0].missingList![] as x>${x}<#else>none</#list>", "none"),
    # built-ins
    ("${reports[0].reimbursed?has_content?c}|${reports[0].approved?has_content?c}", "false|true"),
    ("${reports[0].transactionList[1].modifiedAmount?has_content?c}", "true"),
    ('${"  Mixed Case "?trim?upper_case}|${"ABC"?lower_case}|${"abc"?length}', "MIXED CASE|abc|3"),
    ('${"a:b:c"?replace(":", "/")}', "a/b/c"),
    ('${("12.50"?number * 2)?c}', "25"),
    ('${reports[0].approved?datetime("yyyy-MM-dd HH:mm:ss")?string("dd/MM/yyyy HH:mm")}', "31/07/2026 18:02"),
    ('${reports[0].approved?date("yyyy-MM-dd")?string("yyyy-MM-dd")}', "2026-07-31"),
    ('${1234.5?string("0.00")}|${1234.5?string("#,##0.00")}', "1234.50|1,234.50"),
    ('${["a", "b"]?join(", ")}|${[3, 1, 2]?sort?first}', "a, b|1"),
    ('${flag?then("on", "off")}', "off"),
    ('"${"He said \\"hi\\"\\n</x>"?json_string}"', '"He said \\"hi\\"\\n<\\/x>"'),
    ("'${\"it's\"?js_string}'", "'it\\'s'"),
    ('"${"it\'s"?json_string}"', '"it\'s"'),
    ('${"${reports[0].reportID}-x"}', "R00abc-x"),
    # white-space stripping: lines holding only FTL tags vanish; <#t> trims its line
    ("a\n  <#if addHeader>\n  head\n  </#if>\nb\n", "a\n  head\nb\n"),
    ("<#list [1, 2] as i>\n  ${i},<#t>\n</#list>\n", "1,2,"),
    ("<#list [1, 2] as i>\n  x${i}<#rt>\n</#list>\n", "  x1  x2"),
    ("<#list [1, 2] as i>\n    <#lt>y${i}\n</#list>\n", "y1\ny2\n"),
    ('<#setting number_format="computer">${1234567}', "1234567"),
]


@pytest.mark.parametrize("source,expected", OUTPUT_CASES, ids=[c[0][:40] for c in OUTPUT_CASES])
def test_template_renders_like_freemarker(source, expected):
    assert render(source, MODEL) == expected


ERROR_CASES = [
    # a boolean printed without ?c / ?string is an error, not "true"
    ("${reports[0].transactionList[0].reimbursable}", "Can't convert boolean to string automatically"),
    ("${flag}", "Can't convert boolean to string automatically"),
    ('${"x" + flag}', "Can't convert boolean to string automatically"),
    # null or missing without a default
    ("${reports[0].nope}", "The following has evaluated to null or missing"),
    ("${nothing}", "The following has evaluated to null or missing"),
    ('${nope.deeper!"d"}', "The following has evaluated to null or missing"),  # ! covers only the last step
    ("${nope.x?has_content?c}", "The following has evaluated to null or missing"),
    ("<#list nope as x></#list>", "The following has evaluated to null or missing"),
    # type errors
    ("<#if reports[0].approved>x</#if>", "Expected a boolean, but this has evaluated to a string"),
    ("${reports[0].reportID?c}", "Expected a number, but this has evaluated to a string"),
    ("${reports[0].reportID == 1}", "Can't compare values of these types"),
    ("${reports[0].transactionList}", "Expected a string or something automatically convertible"),
    ('${reports[0].reportID.foo}', "Expected a hash, but this has evaluated to a string"),
    ('${reports[0].reportID < "b"}', "only numbers and dates can be compared"),
    ("${reports[0].modifiedX!0 + reports[0].reportID?number}", "Can't convert this string to number"),
    ("${x?index}", "must be a loop variable"),
    ('${"2026/07/31"?date("yyyy-MM-dd")}', "doesn't match the expected date"),
    ("${1/0}", "division by zero"),
]


@pytest.mark.parametrize("source,message", ERROR_CASES, ids=[c[0][:40] for c in ERROR_CASES])
def test_template_errors_like_freemarker(source, message):
    with pytest.raises(TemplateError) as err:
        render(source, MODEL)
    assert message in str(err.value)
    assert str(err.value).startswith("FreeMarker template error:")


SYNTAX_CASES = [
    ("<#list reports as>", "Expected name"),
    ("<#if true>open", "Unclosed #if"),
    ("${x?no_such_builtin}", 'Unknown built-in: "no_such_builtin"'),
    ("<#macro m></#macro>", "Unknown directive: #macro"),
    ("<@m/>", "not supported"),
    ("</#if>", "Unexpected closing tag"),
    ('${"unclosed}', "String literal was not closed"),
    ("<#-- never closed", "Unclosed comment"),
]


@pytest.mark.parametrize("source,message", SYNTAX_CASES, ids=[c[0] for c in SYNTAX_CASES])
def test_syntax_errors_are_reported_before_rendering(source, message):
    with pytest.raises(TemplateSyntaxError) as err:
        Template(source)
    assert message in str(err.value)


def test_error_text_points_at_the_failing_expression_with_line_and_column():
    with pytest.raises(TemplateError) as err:
        render("line one\n  ${reports[0].nope}", MODEL, name="expensify-export")
    text = str(err.value)
    assert "==> reports[0].nope  [in template \"expensify-export\" at line 2, column 5]" in text


def test_json_string_escapes_what_freemarker_documents():
    assert json_string('q"b\\s/') == 'q\\"b\\\\s/'
    assert json_string("</script>") == "<\\/script>"
    assert json_string("<!--") == "\\u003C!--"
    assert json_string("-->") == "--\\u003E"
    assert json_string("]]>") == "]]\\u003E"
    assert json_string("a>b") == "a>b"
    assert json_string("\x01\t\u2028") == "\\u0001\\t\\u2028"
    assert json_string("it's") == "it's"
    assert js_string("it's") == "it\\'s"
    assert js_string("\x01") == "\\x01"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(list('"\\:\n\r\t<>/!-]\'\u2028\x7f') + ["\\:", "</", "]]>"]),
                         st.characters()), max_size=30).map("".join))
def test_json_string_output_parses_back_to_the_same_string(value):
    rendered = render('"${value?json_string}"', {"value": value})
    assert json.loads(rendered) == value


def test_raw_tag_with_escaped_colon_survives_a_json_round_trip():
    tag = "Amsterdam:Project\\: Zuidas"
    rendered = render('{"tag":"${tag?json_string}"}', {"tag": tag})
    assert json.loads(rendered)["tag"] == tag
