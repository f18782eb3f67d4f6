<#-- expensify-exact export template: renders approved reports as JSON (expensify.md §3, §3.3).
     Expensify's data model types are documented loosely: an amount, a card ID, a tax or exchange rate, even a
     transaction ID may arrive as a number, as a string or empty (§3.2; "use ?has_content for numeric fields
     that may be empty"). So no field is assumed to be a number: a number is printed with ?c, text as a JSON
     string, and nothing as null; the normalizer reads either form. Text fields go through ?string (numbers
     under number_format "computer": no locale grouping) and ?json_string. A boolean prints with
     ?string("true","false"), anything else in its place as a string. ?c appears bare only on reports?size,
     which is certain to be a number. The "count"/"end" trailer tells a complete-but-empty file apart from
     one that is not rendered yet (§2.3). -->
<#setting number_format="computer">
{"reports":[
<#list reports as report>
<#assign total = report.total!"">
{"reportID":"${(report.reportID!"")?string?json_string}",
"reportName":"${(report.reportName!"")?string?json_string}",
"policyID":"${(report.policyID!"")?string?json_string}",
"policyName":"${(report.policyName!"")?string?json_string}",
"status":"${(report.status!"")?string?json_string}",
"currency":"${(report.currency!"")?string?json_string}",
"total":<#if total?is_number>${total?c}<#elseif total?has_content>"${total?string?json_string}"<#else>null</#if>,
"created":"${(report.created!"")?string?json_string}",
"submitted":"${(report.submitted!"")?string?json_string}",
"approved":"${(report.approved!"")?string?json_string}",
"reimbursed":"${(report.reimbursed!"")?string?json_string}",
"accountEmail":"${(report.accountEmail!"")?string?json_string}",
"managerEmail":"${(report.managerEmail!"")?string?json_string}",
"transactionList":[
<#list report.transactionList![] as expense>
<#assign amount = expense.amount!"" converted = expense.convertedAmount!""
         rate = expense.currencyConversionRate!"" modified = expense.modifiedAmount!""
         taxRate = expense.taxRate!"" taxAmount = expense.taxAmount!"" cardID = expense.cardID!""
         reimbursable = expense.reimbursable!false billable = expense.billable!false>
{"transactionID":"${(expense.transactionID!"")?string?json_string}",
"amount":<#if amount?is_number>${amount?c}<#elseif amount?has_content>"${amount?string?json_string}"<#else>null</#if>,
"currency":"${(expense.currency!"")?string?json_string}",
"convertedAmount":<#if converted?is_number>${converted?c}<#elseif converted?has_content>"${converted?string?json_string}"<#else>null</#if>,
"currencyConversionRate":<#if rate?is_number>${rate?c}<#elseif rate?has_content>"${rate?string?json_string}"<#else>null</#if>,
"modifiedAmount":<#if modified?is_number>${modified?c}<#elseif modified?has_content>"${modified?string?json_string}"<#else>null</#if>,
"modifiedCreated":"${(expense.modifiedCreated!"")?string?json_string}",
"modifiedMerchant":"${(expense.modifiedMerchant!"")?string?json_string}",
"created":"${(expense.created!"")?string?json_string}",
"merchant":"${(expense.merchant!"")?string?json_string}",
"category":"${(expense.category!"")?string?json_string}",
"categoryGlCode":"${(expense.categoryGlCode!"")?string?json_string}",
"tag":"${(expense.tag!"")?string?json_string}",
"ntag1":"${(expense.ntag1!"")?string?json_string}",
"ntag2":"${(expense.ntag2!"")?string?json_string}",
"ntag3":"${(expense.ntag3!"")?string?json_string}",
"reimbursable":<#if reimbursable?is_boolean>${reimbursable?string("true","false")}<#else>"${reimbursable?string?json_string}"</#if>,
"billable":<#if billable?is_boolean>${billable?string("true","false")}<#else>"${billable?string?json_string}"</#if>,
"taxName":"${(expense.taxName!"")?string?json_string}",
"taxRate":<#if taxRate?is_number>${taxRate?c}<#elseif taxRate?has_content>"${taxRate?string?json_string}"<#else>null</#if>,
"taxAmount":<#if taxAmount?is_number>${taxAmount?c}<#elseif taxAmount?has_content>"${taxAmount?string?json_string}"<#else>null</#if>,
"taxCode":"${(expense.taxCode!"")?string?json_string}",
"bank":"${(expense.bank!"")?string?json_string}",
"cardID":<#if cardID?is_number>${cardID?c}<#elseif cardID?has_content>"${cardID?string?json_string}"<#else>null</#if>,
"cardNumber":"${(expense.cardNumber!"")?string?json_string}",
"comment":"${(expense.comment!"")?string?json_string}",
"receiptURL":"${((expense.receiptObject.url)!"")?string?json_string}"}<#sep>,</#sep>
</#list>
]}<#sep>,</#sep>
</#list>
],"count":${reports?size?c},"end":true}
